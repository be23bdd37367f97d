from cancelflow_tools.cli import app

app(prog_name="cancelflow")
