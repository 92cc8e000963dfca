"""Cleaning keeps the text a doctor wrote and removes only noise."""

from __future__ import annotations

import pytest

from medqa.cleaning import clean_text, is_greeting_only, normalize_key, normalize_text, scrub_personal_data


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hi;welcome to Chat Doctor The cause of your pain is gas.", "Hi; The cause of your pain is gas."),
        ("Hello and welcome to Chat Doctor forum. Rest well.", "Hello Rest well."),
        (
            "Thanks for asking at Chat Doctor. Take ibuprofen 400 mg. Regards : Chat Doctor.",
            "Take ibuprofen 400 mg. Regards.",
        ),
        ("Dear,Thanks for the query to Chat Doctor virtual Clinic. Your BP is fine.", "Dear, Your BP is fine."),
        ("Thank you for choosing Chat Doctor. See a dermatologist.", "See a dermatologist."),
        (
            "Hello, I am Chat Doctor, I understand your concern. It is benign.",
            "Hello, I am I understand your concern. It is benign.",
        ),
        ("Howell come to ChatDoctorThank for asking.", "Howell come to Thank for asking."),
    ],
)
def test_chat_doctor_artefacts_removed(raw, expected):
    assert clean_text(raw) == expected


def test_rest_of_sentence_untouched():
    text = "Take care... it is NOT serious, see Dr. Rao (ENT) at 10 a.m.; BP 120/80 is normal!"
    assert clean_text(text) == text


def test_html_unicode_and_whitespace():
    assert normalize_text("<p>Fever&nbsp;&amp; cough</p><br/>since   2 days") == "Fever & cough since 2 days"
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert normalize_text("BP < 120 and > 80") == "BP < 120 and > 80"  # not a tag


def test_personal_data_scrubbed():
    text = "Mail me at john.doe@example.com or call +1 (555) 123-4567 / 9876543210, see https://x.org/a?b=1"
    out = scrub_personal_data(text)
    assert "john" not in out and "555" not in out and "9876543210" not in out and "x.org" not in out
    assert out.count("[phone]") == 2 and "[email]" in out and "[url]" in out
    # Doses, dates and blood pressure are not phone numbers.
    keep = "500 mg twice a day since 12/05/2020, BP 140/90, weight 72.5 kg, 2019-2021"
    assert scrub_personal_data(keep) == keep


def test_greeting_only_and_keys():
    assert is_greeting_only("Hello sir") and is_greeting_only("hi doctor!!") and is_greeting_only("")
    assert not is_greeting_only("how to treat high CO2 in blood")
    assert normalize_key("What is  THIS?!") == normalize_key("what is this")
