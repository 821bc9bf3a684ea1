"""`slime pack`: append LLaVA JSON/JSONL + images to a versioned webdataset (manifest, rejects log).

    python -m jobs.pack --config jobs/configs/pack.yaml inputs=[data/new.jsonl] output_dir=s3://bucket/wds
"""

from __future__ import annotations

import json

from jobs.common import job_parser, load_job_config, run_job
from pipelines.data.pack import PackConfig, pack


def main(argv: list[str] | None = None) -> int:
    args = job_parser("pack", __doc__, "pack.yaml").parse_args(argv)
    if (cfg := load_job_config("pack", PackConfig, args)) is None:
        return 2
    # Bad records are counted in the summary and rejects.jsonl, never fatal: exit 0 if the run committed.
    # A missing input file or image root is the user's mistake: one line, exit 2, nothing written.
    return run_job("pack", lambda: print(json.dumps(pack(cfg))))


if __name__ == "__main__":
    raise SystemExit(main())
