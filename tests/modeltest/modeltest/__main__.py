from atb_llm.utils.cli import run_main
from modeltest.cli import main

run_main(main, "modeltest")
