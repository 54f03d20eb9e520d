# The service's gunicorn configuration lives in counter/serving/gunicorn_hooks.py
# so that `counter serve` and `gunicorn -c gunicorn.conf.py` run the same thing.
# Settings come from the environment (see README, "Configuration").
from counter.serving.gunicorn_hooks import *  # noqa: F401,F403
