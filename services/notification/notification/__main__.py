from cancelflow.service import run_service
from notification.bootstrap import build

run_service("notification", build)
