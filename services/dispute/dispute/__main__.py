from cancelflow.service import run_service
from dispute.bootstrap import build

run_service("dispute", build)
