from cancelflow.service import run_service
from payment_gateway.bootstrap import build

run_service("payment_gateway", build)
