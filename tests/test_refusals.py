"""Bad configuration, plans, adapters' index, launch arguments and command-line input: each refused
with a message that names the value and the fix, before anything is loaded or launched."""

import argparse
import json
import shutil

import pytest
import torch

from atb_llm.compression.levels import Level
from atb_llm.compression.plan import MlgcPlan, baseline_plan, num_full_groups, plan_from_levels
from atb_llm.entrypoints.run_pa import read_input_dict, read_prompts
from atb_llm.layers.attention.triton_backend import TritonBackend
from atb_llm.models.base.lora import adapter_paths
from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.utils import distributed


def config_with(tiny, tmp_path, **changes):
    folder = shutil.copytree(tiny, tmp_path / "model")
    raw = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "llama"}, "has model_type='llama'; this engine runs qwen2 models"),
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096}},
            "rope_scaling factor=0.5 must be at least 1",
        ),  # fmt: skip
    ],
)
def test_a_config_the_engine_cannot_run_is_refused(tiny, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_qwen2_config(config_with(tiny, tmp_path, **changes))


def test_config_without_eos_and_with_a_dtype_name(tiny, tmp_path):
    cfg = load_qwen2_config(config_with(tiny, tmp_path, eos_token_id=None, torch_dtype="float32"))
    assert cfg.eos_token_ids == () and cfg.dtype == "float32"


def test_lengths_past_the_models_positions_are_refused(tiny):
    with pytest.raises(ValueError, match=r"max_input_length \+ max_output_length = 4100 exceeds .*=4096; lower them"):
        LLMEngine(EngineConfig(str(tiny), max_input_length=4000, max_output_length=100, progress=False))


def test_plans_of_the_wrong_shape_or_budget_are_refused(tiny, tmp_path):
    config = load_qwen2_config(tiny)  # 2 layers x 2 KV heads
    with pytest.raises(ValueError, match="plan levels must be a 2 x 2 grid"):
        MlgcPlan("qwen2", "h", 2, 2, 16, 4, 11, [["full", "full"]])
    with pytest.raises(FileNotFoundError, match=r"MLGC plan .*nowhere.json does not exist; make one with"):
        MlgcPlan.load(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="3 levels for a model of 4 groups"):
        plan_from_levels(config, [Level()] * 3, 16, 4, 11, "razor", None)
    for ratio in (-0.01, 1.01):
        with pytest.raises(ValueError, match=f"full_ratio={ratio} must be within"):
            num_full_groups(config, ratio)
    assert num_full_groups(config, 0.0) == 0 and num_full_groups(config, 1.0) == 4  # the bounds themselves
    with pytest.raises(ValueError, match="unknown baseline 'h2o'; baselines are streaming, random"):
        baseline_plan("h2o", config, 16)


def test_adapter_index_must_be_a_map_of_unique_names(tiny, tmp_path):
    folder = shutil.copytree(tiny, tmp_path / "model")
    (folder / "lora_adapter.json").write_text(json.dumps(["sql"]))
    with pytest.raises(ValueError, match=r"lora_adapter.json must map adapter names to folders"):
        adapter_paths(folder, None)
    (folder / "lora_adapter.json").write_text(json.dumps({"sql": "sql-lora"}))
    assert adapter_paths(folder, None) == {"sql": (folder / "sql-lora").resolve()}
    with pytest.raises(ValueError, match=r"LoRA adapter 'sql' is named twice .* give each its own name"):
        adapter_paths(folder, {"sql": "/elsewhere"})


def test_triton_backend_arguments_are_checked():
    with pytest.raises(ValueError, match="split_slots=0 must be at least 1"):
        TritonBackend(split_slots=0)
    with pytest.raises(ValueError, match=r"programs=0 must be at least 1 \(or None: from the GPU\)"):
        TritonBackend(programs=0)
    assert TritonBackend(split_slots=1, programs=1).programs == 1


def test_launch_ranks_checks_the_world_size(monkeypatch):
    with pytest.raises(SystemExit, match="a world size of 0 ranks was asked; give 1 or more"):
        distributed.launch_ranks(0, "atb_llm.entrypoints.run_pa", [])
    monkeypatch.setattr(torch.distributed, "is_torchelastic_launched", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="world size 2 asked, torchrun started 3 ranks"):
        distributed.launch_ranks(2, "atb_llm.entrypoints.run_pa", [])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launch_ranks(2, "atb_llm.entrypoints.run_pa", []) is None  # as torchrun started it


def test_run_pa_input_is_checked(tmp_path):
    for bad in ("[]", "{}"):
        with pytest.raises(ValueError, match=r"--input_dict must be a non-empty JSON list"):
            read_input_dict(bad)
    args = argparse.Namespace(input_dict=None, input_file=str(tmp_path / "none.txt"), input_texts=[])
    with pytest.raises(FileNotFoundError, match=r"--input_file .*none.txt does not exist"):
        read_prompts(args)


def test_convert_refuses_other_models_missing_data_and_a_missing_tool(tiny, tmp_path, monkeypatch):
    from atb_llm.entrypoints import convert_quant_weight as cq

    llama = config_with(tiny, tmp_path, model_type="llama")
    with pytest.raises(SystemExit, match=r"config.json has model_type='llama'; this converts qwen2 models"):
        cq.convert(llama, tmp_path / "out", "w8a16", None, None, "cpu")
    with pytest.raises(SystemExit, match=r"--calib .*none.jsonl does not exist; give a .jsonl file"):
        cq.calibration_file(str(tmp_path / "none.jsonl"), 4, tmp_path / "c.jsonl")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    assert cq.calibration_file(str(texts), 2, tmp_path / "c.jsonl").read_text() == '{"text": "a"}\n{"text": "b"}\n'
    monkeypatch.setattr(cq.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"msmodelslim is not installed: pip install msmodelslim==26.1.0"):
        cq.ensure_msmodelslim(install=False)


def test_weight_folders_and_dtypes_are_checked(tmp_path):
    from atb_llm.config import parse_dtype, read_config_json

    assert parse_dtype(torch.float16) is torch.float16 and parse_dtype("torch.bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8' is not supported; use one of bf16, fp16, fp32"):
        parse_dtype("int8")
    with pytest.raises(FileNotFoundError, match=r"weight directory .*absent.* does not exist; pass a Hugging Face"):
        read_config_json(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"config.json is missing; a Hugging Face model folder needs"):
        read_config_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"holds a list, not a JSON object; restore it"):
        read_config_json(tmp_path)


def test_server_arguments_are_checked(capsys):
    from atb_llm.entrypoints.openai.serve import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--tensor_parallel_size", "0"])
    assert "--tensor_parallel_size 0: give 1 or more ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--api_key", " "])
    assert "--api_key is empty: give a key, or leave the flag out" in capsys.readouterr().err


def test_the_layout_changes_only_between_requests(tiny):
    from atb_llm.runtime.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(str(tiny), block_size=16, max_input_length=32, max_output_length=4, progress=False))
    assert engine.step() == []  # nothing scheduled: an empty step
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="set_layout with requests in flight; finish or abort them first"):
        engine.set_layout(engine.layout)
