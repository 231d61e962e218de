"""The camera loop: sources and the grabber thread, the pipeline (grab, preprocess, infer,
postprocess, results), its statistics and snapshots. Imports no other agent subpackage."""
