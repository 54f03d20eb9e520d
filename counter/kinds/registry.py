"""The kinds of events this service counts: a new kind is one line here."""

from counter.kinds import clicks, impressions
from counter.kinds.base import Registry

REGISTRY = Registry(clicks.KIND, impressions.KIND)
CLICKS, IMPRESSIONS = clicks.KIND, impressions.KIND
