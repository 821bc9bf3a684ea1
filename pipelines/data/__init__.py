"""Data stage: everything before training touches a sample.

    synth, synth_tasks   synthetic high-resolution VQA data and the fidelity tasks (demo, tests, benchmarks)
    pack                 LLaVA-format JSON + images -> versioned webdataset shards + manifest.json
    preprocess           what runs in Ray Data workers: ShardReader, the Preprocessor actor, drop counters
    ingest               the streamed Ray Data dataset the training loop reads (DataConfig, build_dataset)

May import: ``pipelines.storage``, ``slime``, ray, webdataset, s3fs. Never the other stages
(``pipelines.train``, ``pipelines.serve``, ``pipelines.lifecycle``) nor ``evaluate``/``demo``: they
consume data, data knows nothing of them. Nothing is imported here.
"""
