"""Re-exports for the seed's ``fisher.core`` path."""
