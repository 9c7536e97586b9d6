#!/usr/bin/env bash
# Session 21, call 5: dev3.sh's A/B, new first, in folders of their own (call 4 ran the
# order new_1 old_1 new_2 in call 3's folders and ran nothing), without check_cuda.py.
TAG=c4 ORDER="new_3 old_3" CHECK=0 exec bash "$(dirname "$0")/dev3.sh"
