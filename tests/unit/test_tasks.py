"""The published Self-Instruct / Alpaca filters and the Alpaca list parser, one case each."""

from __future__ import annotations

import pytest

from polyalign.stages.core.tasks import (
    BLOCKLIST,
    alpaca_prompt,
    alpaca_stop,
    conflicting_inputs,
    instance_problem,
    instruction_problem,
    parse_alpaca,
)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty instruction"),
        ("Name three fruits", "fewer than 4 words"),  # 3 words: dropped (fewer than 4)
        ("Name three red fruits", None),  # 4 words: kept
        ("word " * 150, None),
        ("word " * 151, "more than 150 words"),
        ("Describe the IMAGE in detail please", "blocked word 'image'"),  # any case
        ("Tell me which Maps app is best", "blocked word 'maps'"),
        ("Please go to the shop and report back", "blocked word 'go to'"),  # a phrase
        ("Explain what a graphic designer does", None),  # whole words only: graphic is not graph
        ("Summarize the profile of this person", None),  # nor file inside profile
        ("Write a program that sorts a list of numbers", "starts with 'Write a program'"),
        ("Write a poem about a program that sorts numbers", None),
        ("- List three colours of the rainbow", "starts with punctuation"),
        ('"Explain why the sky is blue today"', "starts with punctuation"),
        ("Écris une phrase sur la mer", "starts with a non-ASCII character"),
        ("¿Qué hora es ahora mismo?", "starts with a non-ASCII character"),
        ("Explain why the sky looks blue during the day.", None),
    ],
)
def test_instruction_filters(text, reason):
    assert instruction_problem(text) == reason


def test_blocklist_is_the_published_one():
    assert set(BLOCKLIST) == {
        "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
        "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
    }


@pytest.mark.parametrize(
    "task_input, output, reason",
    [
        ("", "", "empty output"),
        ("some text", "   ", "empty output"),
        ("3 + 4", "3 + 4", "input equals output"),
        ("3 + 4", " 3 + 4 ", "input equals output"),
        ("3 + 4", "7", None),
        ("", "A short poem.", None),
    ],
)
def test_instance_filters(task_input, output, reason):
    assert instance_problem(task_input, output) == reason


def test_one_input_with_different_outputs_drops_the_task():
    assert conflicting_inputs([("2 + 2", "4"), ("3 + 3", "6"), ("2 + 2", "5")])
    assert not conflicting_inputs([("2 + 2", "4"), ("2 + 2", "4 ")])  # the same output twice
    assert not conflicting_inputs([("", "a"), ("", "b")])  # no input: different outputs are fine


SEEDS = [
    {"instruction": "Give three tips for staying healthy.", "instances": [{"input": "", "output": "Eat well, sleep, move."}]},
    {"instruction": "Translate the sentence into French.", "instances": [{"input": "Good morning.", "output": "Bonjour."}]},
    {"instruction": "Classify the sentiment.", "instances": [{"input": "I love it", "output": "Positive"}]},
]


def test_alpaca_prompt_shows_the_seed_tasks_and_asks_to_continue():
    prompt, first = alpaca_prompt(SEEDS, 20)
    assert first == 4 and prompt.endswith("###\n4. Instruction:")
    assert "1. Input:\n<noinput>\n1. Output:\nEat well, sleep, move." in prompt
    assert "2. Input:\nGood morning.\n2. Output:\nBonjour." in prompt
    assert "23 tasks" in prompt
    assert alpaca_stop(3, 20) == ("24. Instruction:",)


REPLY = (
    " Name two primary colours.\n4. Input:\n<noinput>\n4. Output:\nRed and blue.\n"
    "###\n5. Instruction: Correct the spelling\nin this sentence.\n5. Input:\nI recieved it.\n5. Output:\nI received it.\n"
    "###\n6. Instruction: This item lost its output.\n6. Input:\n<noinput>\n"
    "###\n7. Instruction: Count the vowels in the word.\n7. Input:\nbanana\n7. Output:\n3"
)


def test_alpaca_parser_reads_each_item():
    items = parse_alpaca(REPLY, 4, truncated=False)
    tasks = [t for t, _, _ in items]
    assert tasks[0] == {"instruction": "Name two primary colours.", "input": "", "output": "Red and blue."}
    assert tasks[1] == {"instruction": "Correct the spelling in this sentence.", "input": "I recieved it.", "output": "I received it."}
    assert tasks[2] is None and items[2][2].startswith("unparseable task")
    assert tasks[3] == {"instruction": "Count the vowels in the word.", "input": "banana", "output": "3"}


def test_alpaca_parser_drops_only_a_truncated_last_item():
    items = parse_alpaca(REPLY, 4, truncated=True)
    assert [t is None for t, _, _ in items] == [False, False, True, True]
    assert items[3][2].startswith("truncated") and "banana" in items[3][1]
    assert items[2][2].startswith("unparseable")  # an earlier item is judged on its own


def test_alpaca_parser_wants_the_fields_in_order():
    swapped = " Do a thing now please.\n4. Output:\nx\n4. Input:\ny\n"
    [(task, _, problem)] = parse_alpaca(swapped, 4, truncated=False)
    assert task is None and problem.startswith("unparseable")


def test_self_instruct_list_prompt_and_parser():
    from polyalign.stages.core.tasks import parse_si_list, si_list_prompt, si_list_stop

    prompt, first = si_list_prompt([f"Task number {n} to do" for n in range(1, 9)])
    assert first == 9 and prompt.endswith("\n8. Task number 8 to do\n9.")
    assert "\n\n" in si_list_stop() and "\n16." in si_list_stop()
    reply = " Suggest a name for a\n  bakery.\n10. List two prime numbers.\n11 . Explain tides to a child.\n12. Describe a rainy"
    items = parse_si_list(reply, truncated=False)
    assert [t for t, _, _ in items] == ["Suggest a name for a bakery.", "List two prime numbers.", "Explain tides to a child.", "Describe a rainy"]
    cut = parse_si_list(reply, truncated=True)
    assert [t for t, _, _ in cut][:3] == ["Suggest a name for a bakery.", "List two prime numbers.", "Explain tides to a child."]
    assert cut[3][0] is None and cut[3][2].startswith("truncated")


def test_classification_prompt_and_answer():
    from polyalign.stages.core.tasks import clf_prompt, parse_clf

    prompt = clf_prompt([{"instruction": "Is the review positive?", "is_classification": True}, {"instruction": "Write a haiku.", "is_classification": False}], "Sort the words.")
    assert "Task: Is the review positive?\nClassification task? Yes" in prompt and "Task: Write a haiku.\nClassification task? No" in prompt
    assert prompt.endswith("Task: Sort the words.\nClassification task?")
    assert parse_clf(" Yes") is True and parse_clf("no.") is False and parse_clf(" Maybe") is None and parse_clf("") is None


def test_instances_are_written_input_first_or_label_first():
    from polyalign.stages.core.tasks import instance_prompt

    gen = instance_prompt([{"instruction": "Add the numbers.", "instances": [{"input": "2 3", "output": "5"}, {"input": "1 1", "output": "2"}]}], "Reverse the word.", False)
    assert "Task: Add the numbers.\nExample 1\nInput: 2 3\nOutput: 5\nExample 2\nInput: 1 1\nOutput: 2" in gen
    assert gen.endswith("Task: Reverse the word.\n")
    clf = instance_prompt([{"instruction": "Is the review positive?", "instances": [{"input": "Great!", "output": "Yes"}]}], "Is it a fruit?", True)
    assert "Task: Is the review positive?\nClass label: Yes\nInput: Great!" in clf  # the label comes first


def test_instance_parser():
    from polyalign.stages.core.tasks import parse_instances

    gen = "Example 1\nInput: cat\nOutput: tac\n\nExample 2\nInput: dog\nOutput: god\nExample 3\nInput: owl"
    assert parse_instances(gen, False, truncated=False) == ([("cat", "tac"), ("dog", "god")], 1)
    assert parse_instances(gen, False, truncated=True) == ([("cat", "tac"), ("dog", "god")], 1)
    assert parse_instances("Output: Bonjour.", False, truncated=False) == ([("", "Bonjour.")], 0)
    assert parse_instances("no fields at all", False, truncated=False) == ([], 1)
    clf = "Class label: Positive\nInput: I loved it.\n\nClass label: Negative\nInput: Broken on arrival."
    assert parse_instances(clf, True, truncated=False) == ([("I loved it.", "Positive"), ("Broken on arrival.", "Negative")], 0)
    assert parse_instances(clf, True, truncated=True) == ([("I loved it.", "Positive")], 1)
    assert parse_instances("Input: text without labels", True, truncated=False) == ([], 1)
