from cancelflow.service import run_service
from status_tracker.bootstrap import build

run_service("status_tracker", build)
