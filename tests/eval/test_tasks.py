import re
from collections import Counter

import pytest

from memfit.eval.tasks import TASKS, Question, get_task


def count(text: str) -> int:
    return len(text.split()) * 4 // 3 + 1  # a word-based stand-in for a tokenizer


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("length", [2000, 3000])
def test_tasks_are_deterministic_and_answers_occur_in_context(name, length):
    a, b = TASKS[name](3, length, count), TASKS[name](3, length, count)
    assert a == b
    assert TASKS[name](4, length, count).context != a.context
    assert 0.7 * length <= count(a.context) <= 1.3 * length, count(a.context)
    for q in a.questions:
        assert q.answers and q.answer_prefix
        for ans in q.answers:
            assert ans in a.context, (name, ans)


def test_needles_are_where_the_question_says():
    s = TASKS["niah_multikey"](0, 1500, count)
    (q,) = s.questions
    key = re.search(r"for (\S+) mentioned", q.text).group(1)
    assert f"The special magic number for {key} is: {q.answers[0]}." in s.context
    assert len(re.findall(r"The special magic number for", s.context)) == 3  # two distractors
    assert len(TASKS["niah_multiquery"](0, 1500, count).questions) == 5


def test_variable_chain_is_in_order():
    s = TASKS["variable_tracking"](1, 1500, count)
    names = s.questions[0].answers
    assert s.context.index(f"VAR {names[0]} = ") < s.context.index(f"VAR {names[1]} = VAR {names[0]}")
    assert s.context.index(f"VAR {names[1]} = VAR {names[0]}") < s.context.index(f"VAR {names[2]} = VAR {names[1]}")


@pytest.mark.parametrize("name", ["common_words", "frequent_words"])
def test_word_tasks_answer_is_the_clear_winner(name):
    s = TASKS[name](2, 1500, count)
    words = re.findall(r"[a-z]+", s.context.split("\n", 1)[1])
    top = Counter(words).most_common(2)
    assert top[0][0] == s.questions[0].answers[0] and top[0][1] > 1.5 * top[1][1]


def test_scorer_accepts_right_and_rejects_wrong():
    q = Question("q", ("4821",), "The code is")
    assert q.score("The code is 4821.") == 1.0 and q.score(" 4821") == 1.0
    assert q.score("The code is 4812.") == 0.0
    multi = Question("q", ("Rosa Petrov", "1977"), "")
    assert multi.score("rosa  petrov, 1977") == 1.0 and multi.score("Rosa Petrov in 1978") == 0.5


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: niah_single"):
        get_task("nope")
