"""MMLU test split (57 subjects, 14042 items), k-shot from each subject's dev split, in the
original paper's prompt format; scored on " A" .. " D". Categories as in hendrycks/test
categories.py (subject -> subcategory -> one of four)."""

from __future__ import annotations

from pathlib import Path

from modeltest.datasets import Item, Task, choice_block, take_shots
from modeltest.datasets.olmo import olmo_datasets_dir, read_split

ROOT = Path("hails/mmlu_no_train")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")
SUBJECTS_BY_CATEGORY = {
    "STEM": (
        "abstract_algebra astronomy college_biology college_chemistry college_computer_science college_mathematics "
        "college_physics computer_security conceptual_physics electrical_engineering elementary_mathematics "
        "high_school_biology high_school_chemistry high_school_computer_science high_school_mathematics "
        "high_school_physics high_school_statistics machine_learning"
    ),
    "Social Sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ),
    "Humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ),
    "Other": (
        "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ),
}
SUBJECT_CATEGORY = {s: cat for cat, names in SUBJECTS_BY_CATEGORY.items() for s in names.split()}


def mmlu_prompt(subject: str, shots: list[dict], row: dict) -> str:
    text = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    for shot in shots:
        text += choice_block(shot["question"], shot["choices"], "Answer:") + f" {'ABCD'[shot['answer']]}\n\n"
    return text + choice_block(row["question"], row["choices"], "Answer:")


def load_mmlu(shots: int = 5, data_dir: Path | None = None) -> Task:
    root = olmo_datasets_dir(data_dir) / ROOT
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"no MMLU subjects under {root}")
    unknown = [s for s in subjects if s not in SUBJECT_CATEGORY]
    if unknown:
        raise ValueError(f"MMLU subject(s) {unknown} under {root} have no category; add them to SUBJECTS_BY_CATEGORY")
    items = []
    for subject in subjects:
        dev = take_shots(read_split(root / subject / "dev"), shots, subject)
        for i, row in enumerate(read_split(root / subject / "test")):
            prompt = mmlu_prompt(subject, dev, row)
            items.append(Item(f"{subject}-{i}", prompt, int(row["answer"]), subject, SUBJECT_CATEGORY[subject]))
    return Task("MMLU", (" A", " B", " C", " D"), tuple("ABCD"), CATEGORIES, tuple(items), shots)
