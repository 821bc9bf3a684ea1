"""Train stage: the run config and the explicit training loop on Ray Train.

    config     TrainConfig and its nested sections; the phase schedule is data
    loop       train(): one TorchTrainer run over every phase (batch -> loss -> backward -> step -> report)
    state      checkpoints, resume position, metrics log, the exported self-describing model directory
    parallel   DDP wrap or DeepSpeed engine, applied from outside the model

    mlflow_run the driver's side of the run's MLflow run (rank 0 logs steps through state.RunLog)

May import: ``pipelines.data`` (the dataset it consumes), ``pipelines.storage``, ``pipelines.console``,
``pipelines.plots``, ``pipelines.tracking``, ``slime``, ray.train, torch.distributed, deepspeed. Never ``pipelines.serve``,
``pipelines.lifecycle``, ``evaluate`` or ``demo``. Nothing is imported here (``loop`` pulls in torch and
Ray Train; ``config`` alone is light).
"""
