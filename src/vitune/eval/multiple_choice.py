"""Multiple-choice questions in VMLU's format, scored two ways.

Rows in: VMLU JSONL `{id, question, choices: ["A. ...", ...], answer: "B"}` (optional `subject`,
`category`), or a CSV / table with `question, A, B, C, D[, E], answer` columns. Out: per question,
(1) the log-likelihood of each choice's text after the question, as lm-evaluation-harness's `acc`
(highest sum) and `acc_norm` (highest sum per character), and (2) VMLU's own protocol: the prompt
ending "Đáp án đúng là: ", a greedy answer, its first letter.

Speed: the choices of one question share its prompt, so the prompts of a batch of questions run
once (right-padded) and their KV cache is repeated for the choices, whose tokens then run in one
forward: the prompt is computed once per question instead of once per choice.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from vitune.data.records import Rejection
from vitune.data.sources import read_rows
from vitune.models.loading import cache_keyword

LETTERS = "ABCDEFGHIJ"
VMLU_INSTRUCTION = ("Chỉ đưa ra chữ cái đứng trước câu trả lời đúng ({letters}) "
                    "của câu hỏi trắc nghiệm sau: ")
VMLU_ANSWER = "Đáp án đúng là: "
_PREFIX = re.compile(r"^\s*([A-J])\s*[.):]\s*")


@dataclass
class Question:
    id: str
    question: str
    choices: list[str]  # the choices' texts, without their "A. " prefix
    answer: int  # index into choices
    subject: Optional[str] = None
    category: Optional[str] = None
    source: str = ""  # file:line

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.choices)]


@dataclass
class QuestionFile:
    questions: list[Question] = field(default_factory=list)
    rows_read: int = 0
    rejections: list[Rejection] = field(default_factory=list)


def is_multiple_choice(row: dict) -> bool:
    keys = {str(k).lower() for k in row}
    return "question" in keys and "answer" in keys and ("choices" in keys or {"a", "b"} <= keys)


def read_questions(paths: list[str]) -> QuestionFile:
    """Every question of the files; rows that cannot be scored go to `rejections` with file:line."""
    out, seen = QuestionFile(), {}
    for path in paths:
        for raw in read_rows(path):
            out.rows_read += 1
            if raw.row is None:
                out.rejections.append(Rejection(raw.source, raw.problem[0], raw.problem[1]))
                continue
            try:
                question = parse_question(raw.row, raw.source)
            except ValueError as problem:
                reason, _, detail = str(problem).partition(": ")
                out.rejections.append(Rejection(raw.source, reason, detail, raw.row))
                continue
            if question.id in seen:
                out.rejections.append(Rejection(raw.source, "duplicate id",
                                                f"id {question.id!r} is also at {seen[question.id]}; give each question its own id"))
                continue
            seen[question.id] = raw.source
            out.questions.append(question)
    return out


def parse_question(row: dict, source: str) -> Question:
    """One row -> Question; ValueError("reason: what is wrong and what to do") otherwise."""
    row = {str(k).strip().lower() if str(k).strip().upper() not in LETTERS else str(k).strip().upper(): v
           for k, v in row.items()}
    if not is_multiple_choice(row):
        raise ValueError(f"not multiple choice: expected question, choices (or A, B, ... columns) and answer; "
                         f"got {', '.join(sorted(row))}")
    text = row.get("question")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("missing question: the question is empty")
    if "choices" in row:
        choices = row["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError("bad choices: choices must be a list of strings")
        choices = [_PREFIX.sub("", c, count=1) if _PREFIX.match(c) and _PREFIX.match(c).group(1) == LETTERS[i] else c
                   for i, c in enumerate(choices)]
    else:
        choices = []
        for letter in LETTERS:
            value = row.get(letter)
            if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
                break
            # a CSV column read as numbers (datasets infers types) turns "7" into 7.0: give the text back
            choices.append(str(int(value)) if isinstance(value, float) and value.is_integer() else str(value))
    choices = [c.strip() for c in choices]
    if len(choices) < 2:
        raise ValueError(f"too few choices: {len(choices)} choice(s); a question needs at least 2")
    if any(not c for c in choices):
        raise ValueError("empty choice: a choice is empty")
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "":
        raise ValueError("missing answer: the row has no answer; give its letter (A, B, ...)")
    letter = str(answer).strip().rstrip(".").upper()
    if letter not in LETTERS[: len(choices)] or len(letter) != 1:
        raise ValueError(f"answer not among the choices: answer {answer!r}, but the choices are "
                         f"{', '.join(LETTERS[: len(choices)])}")
    ident = row.get("id")
    ident = str(ident) if ident is not None and str(ident).strip() else source
    subject = row.get("subject")
    category = row.get("category")
    return Question(ident, text.strip(), choices, LETTERS.index(letter),
                    str(subject) if subject else None, str(category) if category else None, source)


# ---------------------------------------------------------------- prompts


def likelihood_context(q: Question, shots: list[Question]) -> str:
    """The text the choices continue: lm-evaluation-harness's MMLU-continuation shape, in Vietnamese."""
    lines = [f"Câu hỏi: {s.question}\nĐáp án: {s.choices[s.answer]}\n\n" for s in shots]
    return "".join(lines) + f"Câu hỏi: {q.question}\nĐáp án:"


def vmlu_prompt(q: Question, shots: list[Question]) -> str:
    """VMLU's zero-/few-shot prompt: the instruction, the question, its lettered choices, "Đáp án đúng là: "."""
    def block(s: Question) -> str:
        choices = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(s.choices))
        return f"{s.question}\n{choices}\n{VMLU_ANSWER}"
    letters = ", ".join(q.letters[:-1]) + f" hoặc {q.letters[-1]}"
    text = VMLU_INSTRUCTION.format(letters=letters) + "\n"
    text += "".join(f"{block(s)}{s.letters[s.answer]}\n\n" for s in shots)
    return text + block(q)


def pick_shots(questions: list[Question], k: int) -> dict[str, list[Question]]:
    """For each question, the first k other questions of its subject (of the file when it has none)."""
    if k <= 0:
        return {q.id: [] for q in questions}
    groups: dict[Optional[str], list[Question]] = defaultdict(list)
    for q in questions:
        groups[q.subject].append(q)
    return {q.id: [s for s in groups[q.subject] if s.id != q.id][:k] for q in questions}


def first_letter(text: str, letters: str) -> Optional[str]:
    """The answer letter of a generated text: the first standalone A-E (of this question's letters)."""
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return match.group(1) if match else None


# ---------------------------------------------------------------- log-likelihoods


def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: the whole text is
    tokenised once and the continuation is what follows the context's own tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    head = tokenizer(context, add_special_tokens=True)["input_ids"]
    if whole[: len(head)] != head:  # the boundary merged: keep the context's ids, tokenise the rest alone
        return head, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return head, whole[len(head):]


def choice_tree(continuations: list[list[int]]) -> tuple[list[int], list[int], dict[tuple[int, ...], int]]:
    """The tokens a question's choices must run through the model, each shared prefix once.

    Choice t1..tn needs the model's prediction after the context (for t1) and after each of its
    prefixes t1..tk, k < n (for t(k+1)); its last token predicts nothing that is scored. Those
    prefixes form a tree: choices that begin alike ("Hà Nội", "Hà Giang") share their first
    nodes. -> (token of each node, parent node or -1, {prefix: node}), parents before children.
    """
    tokens, parents, index = [], [], {}
    for cont in continuations:
        for k in range(1, len(cont)):
            prefix = tuple(cont[:k])
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(cont[k - 1])
                parents.append(index[prefix[:-1]] if k > 1 else -1)
    return tokens, parents, index


def tree_logprobs(model, items: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[list[float]]:
    """Sum of log-probabilities of each continuation after its context, for items (context ids,
    [continuation ids, ...]), in one forward pass per batch: each row holds a context and its
    choices' tree (choice_tree), and a 4-D attention mask lets each node see the context, its
    ancestors and itself, at the positions it would have in its own choice. The exact numbers of
    one forward per choice, for the work of the context once plus each distinct prefix once.
    Rows are laid out [left padding][context][nodes], so the predictions needed are among the last
    (most nodes + 1) positions of every row."""
    import torch

    device = next(model.parameters()).device
    trees = [choice_tree(conts) for _, conts in items]
    slots = max(len(tokens) for tokens, _, _ in trees)
    width = max(len(c) + len(tokens) for (c, _), (tokens, _, _) in zip(items, trees))
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(items), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(items), 1, 1)  # padding sees itself only (no empty row)
    for i, ((context, _), (tokens, parents, _)) in enumerate(zip(items, trees)):
        end = width - len(tokens)  # where the context ends and the nodes begin
        start = end - len(context)
        ids[i, start:end] = torch.tensor(context)
        positions[i, start:end] = torch.arange(len(context))
        allowed[i, start:end, start:end] = torch.ones(len(context), len(context), dtype=torch.bool).tril()
        depth = []
        for j, (token, parent) in enumerate(zip(tokens, parents)):
            q = end + j
            ids[i, q] = token
            depth.append(depth[parent] + 1 if parent >= 0 else 1)
            positions[i, q] = len(context) - 1 + depth[j]
            allowed[i, q, start:end] = True
            k = parent
            while k >= 0:
                allowed[i, q, end + k] = True
                k = parents[k]
    # Of the last (slots + 1) positions, a row with fewer nodes needs only its last (nodes + 1): the
    # output layer (a vocabulary-wide matmul per position) runs on those alone. A pre-hook picks them
    # from the hidden states it is given, so whatever the model does after it (soft-capping, scaling)
    # still applies; its logits come back as one row of every needed position, row after row.
    needed = torch.cat([i * (slots + 1) + torch.arange(slots - len(tokens), slots + 1)
                        for i, (tokens, _, _) in enumerate(trees)]).to(device)

    def picked(module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1])[needed][None], *args[1:])

    hook = model.get_output_embeddings().register_forward_pre_hook(picked)
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=allowed[:, None].to(device),
                           position_ids=positions.to(device), logits_to_keep=slots + 1).logits[0]
    finally:
        hook.remove()
    out, at = [], 0
    for i, (_, conts) in enumerate(items):
        # this row's needed positions: 0 = after the context, 1 + j = after node j
        logprobs = torch.log_softmax(logits[at:at + 1 + len(trees[i][0])].float(), -1)
        at += 1 + len(trees[i][0])
        index = trees[i][2]
        sums = []
        for cont in conts:
            rows = [0] + [1 + index[tuple(cont[:k])] for k in range(1, len(cont))]
            sums.append(float(logprobs[rows, cont].sum()))
        out.append(sums)
    return out


def shared_prefix_logprobs(model, items: list[tuple[list[int], list[list[int]]]], pad_id: int,
                           group: int = 16) -> list[list[float]]:
    """Sum of log-probabilities of each continuation after its context: items are
    (context ids, [continuation ids, ...]). The contexts run once, left-padded, keeping only their last
    logits; their KV cache is then repeated for the continuations, which run in groups of `group`
    sorted by length (so little of a group is padding)."""
    import copy

    import torch

    device = next(model.parameters()).device
    key = cache_keyword()
    width = max(len(c) for c, _ in items)
    contexts = torch.full((len(items), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(contexts)
    for i, (c, _) in enumerate(items):
        contexts[i, width - len(c):], mask[i, width - len(c):] = torch.tensor(c, device=device), 1
    lengths = mask.sum(1)
    with torch.inference_mode():
        out = model(input_ids=contexts, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # what each context predicts next
        cache = getattr(out, key)
        flat = [(i, cont) for i, (_, conts) in enumerate(items) for cont in conts]
        order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
        sums = [0.0] * len(flat)
        for start in range(0, len(order), group):
            chunk = order[start: start + group]
            owners = torch.tensor([flat[j][0] for j in chunk], device=device)
            longest = max(len(flat[j][1]) for j in chunk)
            ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long, device=device)
            for r, j in enumerate(chunk):
                ids[r, : len(flat[j][1])] = torch.tensor(flat[j][1], device=device)
            rows = copy.copy(cache)  # the chunk's own cache: its questions' rows, repeated per choice
            rows.layers = [copy.copy(layer) for layer in cache.layers]
            for layer, source in zip(rows.layers, cache.layers):
                layer.keys, layer.values = source.keys[owners], source.values[owners]
            positions = lengths[owners, None] + torch.arange(longest, device=device)[None]
            full_mask = torch.cat([mask[owners], torch.ones_like(ids)], dim=1)  # right padding is never read
            logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                           **{key: rows}).logits[:, :-1].float() if longest > 1 else None
            for r, j in enumerate(chunk):
                owner, cont = flat[j]
                total = float(first[owner, cont[0]])
                if len(cont) > 1:
                    picked = torch.log_softmax(logits[r, : len(cont) - 1], -1)
                    total += float(picked.gather(1, torch.tensor(cont[1:], device=device)[:, None]).sum())
                sums[j] = total
    out_sums, k = [], 0
    for _, conts in items:
        out_sums.append(sums[k: k + len(conts)])
        k += len(conts)
    return out_sums


# ---------------------------------------------------------------- results


def accuracy_table(questions: list[Question], correct: dict[str, list[bool]]) -> dict:
    """{metric: {"average": acc, "by_category": {...}, "by_subject": {...}}} from per-question booleans."""
    out = {}
    for metric, hits in correct.items():
        entry = {"average": sum(hits) / len(hits) if hits else None}
        for key in ("category", "subject"):
            groups: dict[str, list[bool]] = defaultdict(list)
            for q, hit in zip(questions, hits):
                if getattr(q, key):
                    groups[getattr(q, key)].append(hit)
            if groups:
                entry[f"by_{key}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
        out[metric] = entry
    return out


def answer_distribution(questions: list[Question]) -> dict[str, int]:
    return dict(sorted(Counter(q.letters[q.answer] for q in questions).items()))
