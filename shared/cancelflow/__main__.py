from cancelflow.cli import app

app(prog_name="cancelflow")
