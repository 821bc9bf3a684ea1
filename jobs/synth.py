"""`slime synth`: write a deterministic synthetic high-res VQA dataset (images + LLaVA JSON).

    python -m jobs.synth --config jobs/configs/synth_tiny.yaml seed=1 output_dir=s3://bucket/synth
"""

from __future__ import annotations

import json

from jobs.common import job_parser, load_job_config, run_job
from pipelines.data.synth import SynthConfig, generate


def main(argv: list[str] | None = None) -> int:
    args = job_parser("synth", __doc__, "synth_tiny.yaml").parse_args(argv)
    if (cfg := load_job_config("synth", SynthConfig, args)) is None:
        return 2
    return run_job("synth", lambda: print(json.dumps(generate(cfg))))


if __name__ == "__main__":
    raise SystemExit(main())
