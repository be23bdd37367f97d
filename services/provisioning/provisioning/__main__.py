from cancelflow.service import run_service
from provisioning.bootstrap import build

run_service("provisioning", build)
