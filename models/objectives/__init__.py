"""SSL objectives: pure functions of embeddings (plus an explicit process group).

Every loss returns ``LossParts(loss, parts)`` (a NamedTuple): the scalar loss and a dict of
its unweighted terms, detached (``vicreg_loss``, ``barlow_twins_loss``, ``dino_loss``; ``{}``
for the others). Gathered losses (``nt_xent``, ``contrastive_margin``, ``vicreg_loss``,
``barlow_twins_loss``, ``mocov3_loss``, ``swav_loss``) take ``group`` and ``gather`` and are
exact under DDP: see docs/objectives.md. The multi-crop losses (``dino_loss``,
``swav_loss``) take one tensor per crop, the global crops first.

May import: torch and torch.distributed only.
Imported by: models.methods, tests.
"""

from sslstream.models.objectives._common import LossParts
from sslstream.models.objectives.barlow_twins import barlow_twins_loss
from sslstream.models.objectives.byol import byol_loss
from sslstream.models.objectives.contrastive_margin import contrastive_margin
from sslstream.models.objectives.dino import dino_loss, teacher_temperature
from sslstream.models.objectives.gather import (
    gather_no_grad,
    gather_with_grad,
    get_rank,
    get_world_size,
    is_distributed,
)
from sslstream.models.objectives.info_nce import info_nce
from sslstream.models.objectives.mocov3 import mocov3_loss
from sslstream.models.objectives.nt_xent import nt_xent
from sslstream.models.objectives.simsiam import simsiam_loss
from sslstream.models.objectives.swav import sinkhorn, swav_loss
from sslstream.models.objectives.vicreg import vicreg_loss

__all__ = [
    "LossParts",
    "barlow_twins_loss",
    "byol_loss",
    "contrastive_margin",
    "dino_loss",
    "gather_no_grad",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "info_nce",
    "is_distributed",
    "mocov3_loss",
    "nt_xent",
    "simsiam_loss",
    "sinkhorn",
    "swav_loss",
    "teacher_temperature",
    "vicreg_loss",
]
