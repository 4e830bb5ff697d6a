"""Finding the LM blocks of a model and where they sit (stage, index), for the recorder and the k_n report.

The model protocol (lmfused.nn and lmfused.models, and converted torchvision/timm ResNets): every block is a
module with ``is_lm_block = True``; stages are modules with ``is_lm_stage = True`` that contain the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["BlockInfo", "find_lm_blocks"]


@dataclass(frozen=True)
class BlockInfo:
    """Where an LM block sits: its qualified name, its stage, and its 0-based index within the stage."""

    name: str
    stage: int
    index: int
    module: nn.Module


def find_lm_blocks(model: nn.Module) -> list[BlockInfo]:
    """The modules of ``model`` with ``is_lm_block``, in registration order, with stage and block indices.

    A block belongs to the innermost enclosing module with ``is_lm_stage``; blocks outside any stage are
    grouped by their parent module. Stages are numbered in the order their first block appears.
    """
    named = list(model.named_modules())
    stage_names = [name for name, m in named if getattr(m, "is_lm_stage", False)]
    stages: dict[str, int] = {}
    counts: dict[str, int] = {}
    blocks = []
    for name, module in named:
        if not getattr(module, "is_lm_block", False):
            continue
        owners = [s for s in stage_names if s == "" or name.startswith(s + ".")]
        key = max(owners, key=len) if owners else name.rpartition(".")[0]
        stage = stages.setdefault(key, len(stages))
        index = counts.get(key, 0)
        counts[key] = index + 1
        blocks.append(BlockInfo(name=name, stage=stage, index=index, module=module))
    return blocks
