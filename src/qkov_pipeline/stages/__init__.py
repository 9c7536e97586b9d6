"""One module per workflow stage; each exposes ``run(job)`` (see ``qkov_pipeline.jobs``).

data -> model -> gradients (collect) -> scores -> stats -> tables -> figures -> summary.
"""
