"""C-Eval val split (52 subjects, 1346 items), k-shot from each subject's dev split, in the
official layout: DIR/dev/{subject}_dev.csv and DIR/val/{subject}_val.csv with columns
id,question,A,B,C,D,answer. Scored on "A" .. "D" right after "答案：". Subjects and their
categories from C-Eval's subject_mapping.json."""

from __future__ import annotations

import csv
from pathlib import Path

from modeltest.datasets import Item, Task, choice_block, take_shots

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "CEval"
DOWNLOAD = "https://huggingface.co/datasets/ceval/ceval-exam (ceval-exam.zip)"
CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")
# subject: (English name, Chinese name, category)
SUBJECTS: dict[str, tuple[str, str, str]] = {
    "computer_network": ("Computer Network", "计算机网络", "STEM"),
    "operating_system": ("Operating System", "操作系统", "STEM"),
    "computer_architecture": ("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": ("College Programming", "大学编程", "STEM"),
    "college_physics": ("College Physics", "大学物理", "STEM"),
    "college_chemistry": ("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": ("Probability and Statistics", "概率统计", "STEM"),
    "discrete_mathematics": ("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": ("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": ("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": ("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": ("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": ("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": ("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": ("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": ("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": ("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": ("College Economics", "大学经济学", "Social Science"),
    "business_administration": ("Business Administration", "工商管理", "Social Science"),
    "marxism": ("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("Education Science", "教育学", "Social Science"),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science"),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science"),
    "middle_school_politics": ("Middle School Politics", "初中政治", "Social Science"),
    "middle_school_geography": ("Middle School Geography", "初中地理", "Social Science"),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("Ideological and Moral Cultivation", "思想道德修养与法律基础", "Humanities"),
    "logic": ("Logic", "逻辑学", "Humanities"),
    "law": ("Law", "法学", "Humanities"),
    "chinese_language_and_literature": ("Chinese Language and Literature", "中国语言文学", "Humanities"),
    "art_studies": ("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": ("Professional Tour Guide", "导游资格", "Humanities"),
    "legal_professional": ("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": ("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": ("High School History", "高中历史", "Humanities"),
    "middle_school_history": ("Middle School History", "初中历史", "Humanities"),
    "civil_servant": ("Civil Servant", "公务员", "Other"),
    "sports_science": ("Sports Science", "体育学", "Other"),
    "plant_protection": ("Plant Protection", "植物保护", "Other"),
    "basic_medicine": ("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": ("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": ("Urban and Rural Planner", "注册城乡规划师", "Other"),
    "accountant": ("Accountant", "注册会计师", "Other"),
    "fire_engineer": ("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": (
        "Environmental Impact Assessment Engineer",
        "环境影响评价工程师",
        "Other",
    ),
    "tax_accountant": ("Tax Accountant", "税务师", "Other"),
    "physician": ("Physician", "医师资格", "Other"),
}


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"id", "question", "A", "B", "C", "D", "answer"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; C-Eval CSVs have id,question,A,B,C,D,answer")
    return rows


def ceval_prompt(subject: str, shots: list[dict], row: dict) -> str:
    text = f"以下是中国关于{SUBJECTS[subject][1]}考试的单项选择题，请选出其中的正确答案。\n\n"
    for shot in shots:
        text += choice_block(shot["question"], [shot[c] for c in "ABCD"], "答案：") + f"{shot['answer'].strip()}\n\n"
    return text + choice_block(row["question"], [row[c] for c in "ABCD"], "答案：")


def _subjects(data_dir: Path) -> list[str]:
    val, dev = data_dir / "val", data_dir / "dev"
    files = sorted(val.glob("*_val.csv")) if val.is_dir() and dev.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"C-Eval data not found in {data_dir}: it needs {dev}/<subject>_dev.csv and {val}/<subject>_val.csv. "
            f"Download {DOWNLOAD}, unzip its dev/ and val/ folders there, or pass --data DIR"
        )
    subjects = [f.name.removesuffix("_val.csv") for f in files]
    unknown = [s for s in subjects if s not in SUBJECTS]
    if unknown:
        raise ValueError(f"C-Eval subject(s) {unknown} in {val} are not among the 52 of the C-Eval subject map")
    return subjects


def load_ceval(shots: int = 5, data_dir: Path | None = None) -> Task:
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DIR
    items = []
    for subject in _subjects(data_dir):
        dev_path = data_dir / "dev" / f"{subject}_dev.csv"
        dev = take_shots(read_csv(dev_path), shots, subject) if shots else []
        for row in read_csv(data_dir / "val" / f"{subject}_val.csv"):
            answer = row["answer"].strip()
            if answer not in ("A", "B", "C", "D"):
                raise ValueError(f"{subject}_val.csv id={row['id']}: answer {answer!r} is not one of A B C D")
            prompt = ceval_prompt(subject, dev, row)
            items.append(Item(f"{subject}-{row['id']}", prompt, "ABCD".index(answer), subject, SUBJECTS[subject][2]))
    return Task("CEval", tuple("ABCD"), tuple("ABCD"), CATEGORIES, tuple(items), shots)
