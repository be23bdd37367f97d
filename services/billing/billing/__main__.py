from cancelflow.service import run_service

from billing.bootstrap import build

run_service("billing", build)
