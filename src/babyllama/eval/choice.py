"""Multiple-choice exams (C-Eval / CMMLU): load the questions, prompt in CMMLU's direct-answer
format, and score every question two ways at once.

    letter  the log-probability of each option's letter ("A", "B", ...) right after
            `...答案是：` with the lettered options in the prompt: the MMLU / CMMLU method, one
            forward pass per question.
    text    cloze style: the log-likelihood of each option's TEXT after the question alone
            (no lettered options shown); accuracy by the total, and length-normalised by the
            option's characters (lm-evaluation-harness's acc_norm).

Why both: answering by letter needs two skills, knowing the answer and mapping it to its
label. Small models often have the first without the second and sit at chance on the letter
method while cloze scoring still shows what they know; large models do better by letter,
since comparing options side by side is easier than judging each alone. Reporting both
for every question shows which regime a run is in.

Layouts: a folder of split subfolders (CMMLU: dev/ test/ with `<subject>.csv`; C-Eval:
dev/ val/ test/ with `<subject>_<split>.csv`), one `.csv` file, or one `.jsonl` / `.json`
(a list) file of {"question", "choices" / "options" / "choice": [...] or "A"/"B"/... keys,
"answer": a letter, a 0-based index or the option's text, optional "subject"}.
Reading-comprehension sets (C3, RACE-style) add a passage ("passage", "context", "article" or
"document"; a list of lines is joined), shown before the question as `文章：...`; a CSV may
have such a column too. Few-shot examples come from the dev split of the same subject, or
from a separate shots file. Files are read by `babyllama.data.records`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from babyllama.data.records import Record, csv_rows, first_unreadable, json_list_records
from babyllama.errors import UserError, where
from babyllama.eval.prompting import question_prompt_ids
from babyllama.eval.report import EvalResult
from babyllama.eval.scoring import base_model, score_requests

LETTERS = "ABCDEFGHIJ"  # 2 to 10 options
# Field / column names, tried in order: the options as a list, and a reading passage.
OPTION_FIELDS = ("choices", "options", "choice", "candidates")
PASSAGE_FIELDS = ("passage", "context", "article", "document")

# CMMLU's name_en2zh (haonan-li/CMMLU src/categories.py): the prompt header's subject names.
CMMLU_SUBJECTS = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学",
    "astronomy": "天文学", "business_ethics": "商业伦理",
    "chinese_civil_service_exam": "中国公务员考试", "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策",
    "chinese_history": "中国历史", "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格", "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学", "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学", "college_law": "大学法律",
    "college_mathematics": "大学数学", "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学", "computer_science": "计算机科学",
    "computer_security": "计算机安全", "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理", "economics": "经济学",
    "education": "教育学", "electrical_engineering": "电气工程", "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识", "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学", "ethnology": "民族学", "food_science": "食品科学",
    "genetics": "遗传学", "global_facts": "全球事实", "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学", "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学", "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治", "human_sexuality": "人类性行为",
    "international_law": "国际法学", "journalism": "新闻学", "jurisprudence": "法理学",
    "legal_and_moral_basis": "法律与道德基础", "logical": "逻辑学", "machine_learning": "机器学习",
    "management": "管理学", "marketing": "市场营销", "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语", "nutrition": "营养学", "philosophy": "哲学",
    "professional_accounting": "专业会计", "professional_law": "专业法学",
    "professional_medicine": "专业医学", "professional_psychology": "专业心理学",
    "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学",
    "sports_science": "体育学", "traditional_chinese_medicine": "中医中药", "virology": "病毒学",
    "world_history": "世界历史", "world_religions": "世界宗教",
}

# C-Eval's subject_mapping.json (hkust-nlp/ceval), the Chinese names only.
CEVAL_SUBJECTS = {
    "computer_network": "计算机网络", "operating_system": "操作系统",
    "computer_architecture": "计算机组成", "college_programming": "大学编程",
    "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计",
    "discrete_mathematics": "离散数学", "electrical_engineer": "注册电气工程师",
    "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学",
    "high_school_biology": "高中生物", "middle_school_mathematics": "初中数学",
    "middle_school_biology": "初中生物", "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学",
    "college_economics": "大学经济学", "business_administration": "工商管理",
    "marxism": "马克思主义基本原理", "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "education_science": "教育学", "teacher_qualification": "教师资格",
    "high_school_politics": "高中政治", "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治", "middle_school_geography": "初中地理",
    "modern_chinese_history": "近代史纲要", "ideological_and_moral_cultivation": "思想道德修养与法律基础",
    "logic": "逻辑学", "law": "法学", "chinese_language_and_literature": "中国语言文学",
    "art_studies": "艺术学", "professional_tour_guide": "导游资格",
    "legal_professional": "法律职业资格", "high_school_chinese": "高中语文",
    "high_school_history": "高中历史", "middle_school_history": "初中历史",
    "civil_servant": "公务员", "sports_science": "体育学", "plant_protection": "植物保护",
    "basic_medicine": "基础医学", "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师", "accountant": "注册会计师",
    "fire_engineer": "注册消防工程师", "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "tax_accountant": "税务师", "physician": "医师资格",
}


@dataclass
class Question:
    subject: str
    question: str
    options: list[str]
    answer: int      # index into options
    where: str       # "file:line" of the record
    passage: str | None = None  # reading comprehension: the text the question is about


@dataclass
class Exam:
    path: str
    split: str | None                      # the split scored; None for a single file
    questions: dict[str, list[Question]]   # subject -> questions, subjects sorted
    shots: dict[str, list[Question]]       # subject -> few-shot examples, in file order
    names: dict[str, str]                  # subject -> its name in the prompt header


def subject_name(subject: str, ceval: bool = False) -> str:
    """The Chinese name of a CMMLU / C-Eval subject; the file stem for others. The two
    benchmarks share some stems (and name high_school_physics differently): the layout decides
    which list comes first."""
    first, second = (CEVAL_SUBJECTS, CMMLU_SUBJECTS) if ceval else (CMMLU_SUBJECTS, CEVAL_SUBJECTS)
    return first.get(subject) or second.get(subject) or subject.replace("_", " ")


# ----------------------------------------------------------------------------------------
# Loading


def make_question(at: str, subject: str, question, options: list, answer,
                  passage=None) -> Question:
    """Validate one record. `answer`: a letter, a 0-based index, or the text of an option.
    `passage`: a string, a list of lines, or None.

    Raises UserError "at: problem" for an empty question, too few or too many options, an
    empty option, no answer, an answer of another type (true, 1.5), an index or letter outside
    the options, and an answer that is the text of two identical options (which one is meant
    cannot be told)."""
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{at}: the question is empty")
    if not 2 <= len(options) <= len(LETTERS):
        raise UserError(f"{at}: {len(options)} options; 2 to {len(LETTERS)} are supported")
    texts = []
    for letter, o in zip(LETTERS, options):
        if isinstance(o, bool) or not isinstance(o, (str, int, float)) or not str(o).strip():
            raise UserError(f"{at}: option {letter} is empty or not text")
        texts.append(str(o).strip())
    letters = LETTERS[:len(texts)]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(texts):
            raise UserError(f"{at}: answer index {answer} is outside the options 0-{len(texts) - 1}")
        index = answer
    elif isinstance(answer, str) and answer.strip():
        letter = answer.strip().upper()
        same = [i for i, t in enumerate(texts) if t == answer.strip()]
        if len(same) > 1:
            named = ", ".join(letters[i] for i in same[:-1]) + f" and {letters[same[-1]]}"
            raise UserError(f"{at}: answer '{answer.strip()}' is ambiguous: options {named} are "
                            f"{'both' if len(same) == 2 else 'all'} '{texts[same[0]]}'; "
                            f"make the options differ")
        if letter in letters:
            index = letters.index(letter)
        elif answer.strip() in texts:  # the answer written out, as C3 gives it
            index = texts.index(answer.strip())
        else:
            raise UserError(f"{at}: answer '{answer.strip()}' is not one of the options "
                            f"{letters[0]}-{letters[-1]}")
    elif answer is None or isinstance(answer, str):
        raise UserError(f"{at}: no answer (a split without answers, like C-Eval's test, "
                        "cannot be scored)")
    else:
        raise UserError(f"{at}: answer must be a letter, a 0-based index or the option's text, "
                        f"got {json.dumps(answer, ensure_ascii=False)}")
    twins = [letters[i] for i, t in enumerate(texts) if t == texts[index] and i != index]
    if twins:
        # Cloze scoring gives identical options identical log-likelihoods: the tie would be
        # scored as right or wrong by position alone.
        raise UserError(f"{at}: the answer {letters[index]} ('{texts[index]}') is also option "
                        f"{', '.join(twins)}; make the options differ")
    return Question(subject, question.strip(), texts, index, at, passage_text(at, passage))


def passage_text(at: str, passage) -> str | None:
    """A passage as one string: a list of lines (C3's dialogues) joined by newlines."""
    if isinstance(passage, list) and all(isinstance(p, str) for p in passage):
        passage = "\n".join(p.strip() for p in passage)
    if passage is None:
        return None
    if isinstance(passage, str):
        return passage.strip() or None
    raise UserError(f"{at}: the passage is not text")


def csv_columns(path: Path, header: list[str]) -> tuple[int, int, list[int]]:
    """Indices of the question, answer and option (A, B, ...) columns, matched
    case-insensitively; others (an unnamed index, id, explanation) are ignored."""
    names = [h.strip().lower() for h in header]
    found = ",".join(header)
    for need in ("question", "answer"):
        if need not in names:
            raise UserError(f"{where(path, 1)}: no '{need}' column (header: {found})")
    letters = sorted(n for n in names if len(n) == 1 and n.isalpha())
    if len(letters) < 2 or letters != list(LETTERS[:len(letters)].lower()):
        raise UserError(f"{where(path, 1)}: option columns must be A, B, ... consecutive from A "
                        f"(2 to {len(LETTERS)}) (header: {found})")
    return names.index("question"), names.index("answer"), [names.index(n) for n in letters]


def bad_csv(record: Record) -> str:
    """How an unreadable CSV row is worded: "bad CSV (...)" for what csv itself rejects; the
    reader's own problems (not UTF-8, an unclosed quote) are worded well already."""
    problem = record.value.problem
    if record.value.reason == "malformed CSV":
        return f"bad CSV ({problem.removeprefix('malformed CSV: ')})"
    return problem


def csv_questions(path: Path, subject: str) -> list[Question]:
    """The questions of a CMMLU / C-Eval style CSV (a header with Question, A, B, ..., Answer
    and optionally a passage column); a row is named by the line it starts on."""
    rows = first_unreadable(csv_rows(path, whole=True), bad_csv)
    header = next(rows, None)
    if header is None:
        raise UserError(f"{path}: empty file")
    q_col, a_col, o_cols = csv_columns(path, header.value)
    names = [h.strip().lower() for h in header.value]
    p_col = next((names.index(n) for n in PASSAGE_FIELDS if n in names), None)
    width = max(q_col, a_col, *o_cols) + 1
    questions = []
    for row in rows:
        cells = row.value
        if len(cells) < width:
            raise UserError(f"{row.where}: {len(cells)} fields, the header has {len(header.value)}")
        passage = cells[p_col] if p_col is not None and p_col < len(cells) else None
        questions.append(make_question(row.where, subject, cells[q_col],
                                       [cells[i] for i in o_cols], cells[a_col], passage))
    if not questions:
        raise UserError(f"{path}: no questions (only a header)")
    return questions


def object_questions(path: Path, subject: str) -> list[Question]:
    """The questions of a .jsonl / .json file (see the module docstring for the fields)."""
    questions = []
    # Choice has always called a bad line "not valid JSON".
    records = json_list_records(path, "question objects", lambda r: "not valid JSON "
                                f"({r.value.problem.removeprefix('invalid JSON: ')})")
    for record in records:
        rec, at = record.value, record.where
        if not isinstance(rec, dict):
            raise UserError(f"{at}: expected a JSON object")
        listed = next((k for k in OPTION_FIELDS if k in rec), None)
        if listed is not None:
            options = rec[listed]
            if not isinstance(options, list):
                raise UserError(f"{at}: '{listed}' must be a list of option texts")
        else:
            keys = {k.upper(): k for k in rec if len(k) == 1 and k.isalpha()}
            if not keys or sorted(keys) != list(LETTERS[:len(keys)]):
                raise UserError(f"{at}: give the options as 'choices': [...] (or 'options', "
                                "'choice', 'candidates') or keys A, B, ... consecutive from A")
            options = [rec[keys[c]] for c in sorted(keys)]
        passage = next((rec[k] for k in PASSAGE_FIELDS if k in rec), None)
        questions.append(make_question(at, str(rec.get("subject") or subject), rec.get("question"),
                                       options, rec.get("answer"), passage))
    if not questions:
        raise UserError(f"{path}: empty file")
    return questions


def read_file(path: Path, subject: str) -> list[Question]:
    """The questions of one .csv, .jsonl or .json file."""
    if path.suffix in (".jsonl", ".json"):
        return object_questions(path, subject)
    if path.suffix == ".csv":
        return csv_questions(path, subject)
    raise UserError(f"{path}: expected a .csv or .jsonl file (or a .json list)")


def by_subject(questions: list[Question]) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {}
    for q in questions:
        out.setdefault(q.subject, []).append(q)
    return dict(sorted(out.items()))


def has_answers(folder: Path) -> bool:
    """Whether a split's first CSV gives an answer for its first question (C-Eval's test split
    has an empty or no answer column)."""
    rows = (r.value for r in csv_rows(min(folder.glob("*.csv")), whole=True)
            if isinstance(r.value, list))
    names = [h.strip().lower() for h in next(rows, [])]
    row = next(rows, [])
    col = names.index("answer") if "answer" in names else len(row)
    return col < len(row) and bool(row[col].strip())


def read_split(folder: Path, split: str) -> tuple[list[Question], bool]:
    """A split's questions, and whether its files follow C-Eval's `<subject>_<split>` naming."""
    questions, ceval = [], False
    for f in sorted(folder.glob("*.csv")):
        subject = f.stem.removesuffix(f"_{split}")
        ceval |= subject != f.stem
        questions += csv_questions(f, subject)
    return questions, ceval


def load_folder(root: Path, split: str | None) -> Exam:
    splits = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("*.csv"))}
    if not splits:
        raise UserError(f"{root}: no split subfolders holding CSV files (expected dev/ and "
                        "test/ or val/, each with one CSV per subject)")
    found = ", ".join(splits)
    if split is None:
        # C-Eval's test split has no public answers: score val there. Elsewhere test, so that
        # its problems (a missing split, a bad file) are reported as such.
        test_ok = "test" in splits and has_answers(splits["test"])
        split = "test" if test_ok or "val" not in splits else "val"
    if split not in splits:
        raise UserError(f"{root}: no '{split}' split (found: {found})")
    questions, ceval = read_split(splits[split], split)
    # Never draw shots from the split being scored: a question could be its own example.
    shots = read_split(splits["dev"], "dev")[0] if "dev" in splits and split != "dev" else []
    grouped = by_subject(questions)
    return Exam(str(root), split, grouped, by_subject(shots),
                {s: subject_name(s, ceval) for s in grouped})


def load_exam(path: str | Path, split: str | None = None, shots_file: str | Path | None = None) -> Exam:
    """Questions per subject from a folder of splits, a .csv or a .jsonl file. `split`: the
    split to score (default: test if it has answers, else val). `shots_file`: few-shot examples
    (.csv or .jsonl) in place of the dev split; those without a subject serve every subject."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: no such file or folder")
    if root.is_dir():
        exam = load_folder(root, split)
    else:
        if split is not None:
            raise UserError(f"{root}: a split ('{split}') can only be chosen in a folder of splits")
        grouped = by_subject(read_file(root, root.stem))
        exam = Exam(str(root), None, grouped, {}, {s: subject_name(s) for s in grouped})
    if shots_file is not None:
        shots = by_subject(read_file(Path(shots_file), ""))
        general = shots.get("", [])
        exam.shots = {s: shots.get(s, general) for s in exam.questions}
    return exam


# ----------------------------------------------------------------------------------------
# Prompts

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def header(name: str, cloze: bool) -> str:
    # The cloze prompt shows no lettered options, so it does not ask for one.
    ask = "请直接给出正确答案。" if cloze else "请直接给出正确答案的选项。"
    return f"以下是关于{name}的单项选择题，{ask}\n\n"


def block(q: Question, cloze: bool) -> str:
    """`题目：...\\nA. ...\\nB. ...\\n答案是：` (cloze: without the lettered options), after
    `文章：...` for a reading-comprehension question."""
    lines = [f"文章：{q.passage}"] if q.passage else []
    lines.append(f"题目：{q.question}")
    if not cloze:
        lines += [f"{letter}. {o}" for letter, o in zip(LETTERS, q.options)]
    return "\n".join(lines) + "\n答案是："


def answer_text(q: Question, option: int, cloze: bool) -> str:
    return q.options[option] if cloze else LETTERS[option]


def requests(tokenizer, q: Question, shots: list[Question], name: str, *, cloze: bool,
             chat: bool) -> list[Request]:
    """(context, continuation) for each option after a prompt with these shots.

    Plain: the prompt and the answer are tokenized as one text and the context is the longest
    prefix shared with the prompt alone, so a tokenizer that merges across the boundary
    ("：A") is scored on the tokens it would really produce there. Chat: the answer is the
    assistant's message, which encode_chat tokenizes on its own.
    """
    turns = [(block(s, cloze), answer_text(s, s.answer, cloze)) for s in shots]
    question = block(q, cloze)
    # The header opens the first user message (or the plain text).
    if turns:
        turns[0] = (header(name, cloze) + turns[0][0], turns[0][1])
    else:
        question = header(name, cloze) + question
    prompt = question_prompt_ids(tokenizer, turns, question, chat=chat)
    answers = [answer_text(q, i, cloze) for i in range(len(q.options))]
    if chat:
        out = [(prompt, tokenizer.encode(a)) for a in answers]
    else:
        out = []
        for a in answers:
            full = question_prompt_ids(tokenizer, turns, question + a, chat=False)
            p = next((i for i, (x, y) in enumerate(zip(prompt, full)) if x != y), len(prompt))
            out.append((full[:p], full[p:]))
    # The letter method scores one token: the first one that spells the letter.
    return out if cloze else [(ctx, cont[:1]) for ctx, cont in out]


def fitted_requests(tokenizer, q: Question, shots: list[Question], name: str, *, cloze: bool,
                    chat: bool, context: int) -> tuple[list[Request], int]:
    """`requests` with as many of the shots as fit the model's context (continuation
    included), dropping the longest first as CMMLU does; and how many were kept. With none
    left a prompt may still be too long: score_requests then cuts it on the left."""
    shots = list(shots)
    while True:
        reqs = requests(tokenizer, q, shots, name, cloze=cloze, chat=chat)
        if not shots or max(len(c) + len(t) - 1 for c, t in reqs) <= context:
            return reqs, len(shots)
        sizes = [len(tokenizer.encode(block(s, cloze) + answer_text(s, s.answer, cloze))) for s in shots]
        del shots[sizes.index(max(sizes))]


# ----------------------------------------------------------------------------------------
# Scoring


@dataclass
class ChoiceOptions:
    data: str                          # a folder of splits, a .csv or a .jsonl file
    split: str | None = None           # default: test if it has answers, else val
    shots: int = 0                     # k-shot examples from the dev split (or shots_file)
    subjects: list[str] | None = None  # only these subjects (file stems)
    chat: bool = False                 # prompt through the run's chat template
    limit: int | None = None           # the first N questions of each subject
    batch_size: int = 16
    progress: bool = True
    shots_file: str | None = None      # few-shot examples in place of the dev split

    def check(self) -> None:
        if self.shots < 0:
            raise UserError(f"--shots must be 0 or more, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1 (questions per subject), got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class Graded:
    question: Question
    letter: list[float]   # log-probability of each option's letter
    text: list[float]     # log-likelihood of each option's text
    shots: int            # examples in the prompt (the fewer of the two methods')
    truncated: bool       # a prompt was cut on the left to fit the context

    @property
    def letter_pred(self) -> int:
        return argmax(self.letter)

    @property
    def text_pred(self) -> int:
        return argmax(self.text)

    @property
    def norm_pred(self) -> int:
        return argmax([lp / len(o) for lp, o in zip(self.text, self.question.options)])


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def grade_subject(model, tokenizer, exam: Exam, subject: str, questions: list[Question],
                  opts: ChoiceOptions, context: int) -> list[Graded]:
    """Both methods for every question of one subject, scored in one batched pass (a subject
    at a time keeps the token lists of a 5-shot run over 11k questions out of memory)."""
    shots = exam.shots.get(subject, [])[:opts.shots]
    name = exam.names[subject]
    built = []
    for q in questions:
        letter, k1 = fitted_requests(tokenizer, q, shots, name, cloze=False, chat=opts.chat,
                                     context=context)
        text, k2 = fitted_requests(tokenizer, q, shots, name, cloze=True, chat=opts.chat,
                                   context=context)
        built.append((letter, text, min(k1, k2)))
    flat = [r for letter, text, _ in built for r in letter + text]
    scored = iter(score_requests(model, flat, batch_size=opts.batch_size, desc=subject,
                                 progress=opts.progress))
    graded = []
    for q, (letter, text, k) in zip(questions, built):
        ls = [next(scored) for _ in letter]
        ts = [next(scored) for _ in text]
        graded.append(Graded(q, [s.logprob for s in ls], [s.logprob for s in ts], k,
                             any(s.truncated for s in ls + ts)))
    return graded


def chosen_subjects(exam: Exam, wanted: list[str] | None) -> list[str]:
    known = list(exam.questions)
    unknown = [s for s in wanted or [] if s not in exam.questions]
    if unknown:
        some = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
        raise UserError(f"{exam.path}: unknown subject '{unknown[0]}' (known: {some})")
    return [s for s in known if s in wanted] if wanted else known


def accuracies(graded: list[Graded]) -> tuple[float, float, float]:
    n = len(graded)
    return (sum(g.letter_pred == g.question.answer for g in graded) / n,
            sum(g.text_pred == g.question.answer for g in graded) / n,
            sum(g.norm_pred == g.question.answer for g in graded) / n)


def example(g: Graded) -> dict:
    q = g.question
    return {"subject": q.subject, "where": q.where, "answer": LETTERS[q.answer],
            "letter_pred": LETTERS[g.letter_pred], "text_pred": LETTERS[g.text_pred],
            "text_norm_pred": LETTERS[g.norm_pred], "letter_logprobs": g.letter,
            "text_logprobs": g.text, "shots": g.shots, "truncated": g.truncated}


def run_choice(model, tokenizer, opts: ChoiceOptions) -> EvalResult:
    """Score a model on a multiple-choice exam: accuracy per subject, macro (mean over
    subjects, the headline) and micro (over questions), by letter and by option text."""
    opts.check()
    exam = load_exam(opts.data, opts.split, opts.shots_file)
    subjects = chosen_subjects(exam, opts.subjects)
    if opts.shots and not any(exam.shots.get(s) for s in subjects):
        raise UserError(f"{exam.path}: {opts.shots}-shot needs examples: a dev split other than "
                        "the one scored, or a shots file")
    context = base_model(model).config.max_position_embeddings
    graded: dict[str, list[Graded]] = {}
    for s in subjects:
        graded[s] = grade_subject(model, tokenizer, exam, s, exam.questions[s][:opts.limit],
                                  opts, context)
    everything = [g for gs in graded.values() for g in gs]
    per_subject = {s: accuracies(gs) for s, gs in graded.items()}
    macro = [sum(a[i] for a in per_subject.values()) / len(per_subject) for i in range(3)]
    micro = accuracies(everything)
    chance = sum(sum(1 / len(g.question.options) for g in gs) / len(gs)
                 for gs in graded.values()) / len(graded)
    columns = ["subject", "n", "letter acc", "text acc", "text acc (norm)"]
    rows = [dict(zip(columns, (s, len(graded[s]), *a))) for s, a in per_subject.items()]
    rows.append(dict(zip(columns, ("average (macro)", len(everything), *macro))))
    metrics = {"acc_letter": macro[0], "acc_text": macro[1], "acc_text_norm": macro[2],
               "acc_letter_micro": micro[0], "acc_text_micro": micro[1],
               "acc_text_norm_micro": micro[2], "n": len(everything), "subjects": len(graded),
               "chance": chance,
               # Questions whose prompt held fewer than `shots` examples (a short dev split, or
               # dropped to fit the context), and prompts cut on the left even with none.
               "shots_dropped": sum(g.shots < opts.shots for g in everything),
               "truncated": sum(g.truncated for g in everything)}
    settings = {"split": exam.split, "shots": opts.shots, "chat": opts.chat, "limit": opts.limit,
                "subjects": ",".join(opts.subjects) if opts.subjects else "all",
                "context": context, "prompt": "CMMLU direct answer"}
    return EvalResult("choice", opts.data, metrics, columns, rows, settings,
                      [example(g) for g in everything])
