from atb_llm.utils.cli import run_main
from examples.server.serve import main

run_main(main, "server")
