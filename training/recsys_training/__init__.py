"""Training pipeline for recsys: interaction logs in, a versioned model bundle out.

`data` reads and validates the project's interaction/catalog format (and converts
MovieLens-100k into it), `features` encodes ranker inputs exactly as rank-svc does,
`models` holds the PyTorch models, `bundle` publishes what serving loads.
"""
