"""Masking what translation must not touch, restoring it, and paragraph splitting: one case
per kind of span and per failure."""

from __future__ import annotations

import pytest

from polyalign.stages.core.masking import join, mask, only_markers, paragraphs, restore


@pytest.mark.parametrize(
    "text, originals, kinds",
    [
        ("Run ```python\nprint(1)\n\nx = 2\n``` now.", ("```python\nprint(1)\n\nx = 2\n```",), ("code block",)),
        ("Call `len(x)` on it.", ("`len(x)`",), ("inline code",)),
        ("See https://example.org/a?b=1. Thanks", ("https://example.org/a?b=1",), ("url",)),
        ("Write to ana.lopez+news@mail.example.com today", ("ana.lopez+news@mail.example.com",), ("e-mail",)),
        ("Dear {name}, your order {{order_id}} ships.", ("{name}", "{{order_id}}"), ("placeholder", "placeholder")),
        ("It costs 1,299.50 or -3 or 45% at 10:30.", ("1,299.50", "-3", "45%", "10:30"), ("number",) * 4),
        ("Keep [[7]] as it is", ("[[7]]",), ("marker-like text",)),
        ("COVID-19 and v2 and 3D", ("19",), ("number",)),  # letters around digits stay
        ("A url in code: `http://x.org/1`", ("`http://x.org/1`",), ("inline code",)),  # the outer span wins
    ],
)
def test_each_kind_is_masked(text, originals, kinds):
    m = mask(text)
    assert m.originals == originals and m.kinds == kinds
    for n in range(1, len(originals) + 1):
        assert f"[[{n}]]" in m.text
    assert restore(m.text, m) == (text, None)


def test_restore_puts_spans_back_into_a_translation():
    m = mask("Send the file to bob@example.com before 5 pm using `scp`.")
    assert m.text == "Send the file to [[1]] before [[2]] pm using [[3]]."
    fr = "Envoyez le fichier à [[1]] avant [[2]] h avec [[3]]."
    assert restore(fr, m) == ("Envoyez le fichier à bob@example.com avant 5 h avec `scp`.", None)
    moved = "Avec [[3]], envoyez à [[1]] avant [[2]] h."  # the order may change
    assert restore(moved, m)[0] == "Avec `scp`, envoyez à bob@example.com avant 5 h."


@pytest.mark.parametrize(
    "translated, problem",
    [
        ("Envoyez à [[1]] avant [[2]] h.", "masked inline code [[3]] lost in translation"),
        ("Envoyez à [[1]] [[1]] avant [[2]] h avec [[3]].", "masked e-mail [[1]] repeated in translation"),
        ("Envoyez à [[1]] avant [[2]] h avec [[3]] [[4]].", "marker [[4]] in translation was never in the source"),
    ],
)
def test_a_restoration_that_fails_says_why(translated, problem):
    m = mask("Send the file to bob@example.com before 5 pm using `scp`.")
    assert restore(translated, m) == (None, problem)


def test_paragraphs_split_and_join_back_exactly():
    text = "First paragraph,\nline two.\n\nSecond one.\n  \n\nThird."
    paras, seps = paragraphs(text)
    assert paras == ["First paragraph,\nline two.", "Second one.", "Third."]
    assert join(paras, seps) == text
    assert paragraphs("one") == (["one"], [])


def test_a_code_block_with_blank_lines_stays_one_paragraph_after_masking():
    m = mask("Fix this:\n\n```\na = 1\n\nb = 2\n```\n\nThen explain.")
    paras, _ = paragraphs(m.text)
    assert paras == ["Fix this:", "[[1]]", "Then explain."]
    assert only_markers(paras[1]) and not only_markers(paras[0])


def test_masking_only_the_chosen_kinds():
    text = "Email ana@example.com the 3 files from `ls` at {when}."
    assert mask(text, ["number"]).originals == ("3",)
    assert mask(text, ["email", "code"]).originals == ("ana@example.com", "`ls`")
    assert mask(text, []).text == text
    assert mask("Keep [[2]] and 5", []).originals == ("[[2]]",)  # marker-like text always
