"""MindIE's launcher, as the model zoo runs it from the repository root:

    python -m examples.run_pa --model_path WEIGHT_DIR --input_texts "What is deep learning?" --is_chat_model

The command lives in the package: atb_llm.entrypoints.run_pa."""

from atb_llm.entrypoints.run_pa import cli

if __name__ == "__main__":
    cli()
