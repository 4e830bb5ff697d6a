"""``python -m lmfused.train`` / ``lmfused-train``: parse, check, set up the process group, train.

Exit codes: 0 when training ends, stops at --max-steps, or is interrupted by SIGTERM/SIGINT after saving its
checkpoint; 2 for a bad setting, missing data or package, or an unusable checkpoint (one message on stderr,
nothing written).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lmfused.train.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path
from lmfused.train.config import PROG, UsageError, parse_explicit, resolve_config
from lmfused.train.distributed import env_world, init_distributed, shutdown

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the training command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    rank, _, world_size = env_world()
    try:
        explicit = parse_explicit(argv)
        ckpt = None
        if "resume" in explicit:
            path = resolve_checkpoint_path(explicit["resume"])
            ckpt = load_checkpoint(path)
            explicit["resume"] = str(path)
            explicit.setdefault("out", str(path.parent))  # a resumed run goes on where its checkpoint is
        cfg = resolve_config(explicit, ckpt["config"] if ckpt else None, world_size=world_size)
        info = init_distributed(cfg.device)
        try:
            from lmfused.train.loop import Trainer  # heavy imports only once the arguments are good

            return Trainer(cfg, info, ckpt).fit()
        finally:
            shutdown()
    except (UsageError, CheckpointError) as exc:
        where = f"[rank {rank}] " if world_size > 1 else ""
        print(f"{PROG}: error: {where}{exc}", file=sys.stderr, flush=True)
        return 2
