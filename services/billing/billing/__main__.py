from billing.bootstrap import build
from cancelflow.service import run_service

run_service("billing", build)
