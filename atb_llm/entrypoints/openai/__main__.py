from atb_llm.entrypoints.openai.serve import main
from atb_llm.utils.cli import run_main

run_main(main, "server")
