"""The embedded demo dataset: a synthetic, HealthCareMagic-shaped sample of patient questions and answers.

No real patient data: questions and answers are composed from the templates and per-specialty sentence banks
below with `random.Random(seed)`, so the same `n` and `seed` give byte-identical JSON in the layout of
HealthCareMagic-100k.json (`instruction`, `input`, `output`). A fixed list of faulty records (`NOISE`:
duplicates, "Chat Doctor" artefacts, empty answers, HTML, personal data, a missing key...) is planted at fixed
positions (`planted_noise(n)`) so that the cleaning stage has work to do.

Regenerate with `python tools/make_sample.py` (writes data/sample/healthcaremagic_sample.json and its README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

INSTRUCTION = "If you are a doctor, please answer the medical questions based on the patient's description."
DEFAULT_OUT = "data/sample/healthcaremagic_sample.json"


def _bank(specialist: str, sex: str, ages: str, **fields: str) -> dict[str, Any]:
    """One specialty's word bank; every text field is a `|`-separated list, symptoms are `phrase=noun`."""
    bank: dict[str, Any] = {k: v.split("|") for k, v in fields.items()}
    bank["symptoms"] = [tuple(s.split("=")) for s in bank["symptoms"]]
    lo, hi = ages.split("-")
    bank.update(specialist=specialist, sex=sex, ages=(int(lo), int(hi)))
    return bank


SPECIALTIES: dict[str, dict[str, Any]] = {
    "cardiology": _bank(
        "cardiologist",
        "",
        "32-79",
        symptoms="chest pain spreading to the left arm=chest pain|a pounding heartbeat at rest=palpitations|"
        "breathlessness on climbing stairs=breathlessness|swelling of both ankles by evening=ankle swelling",
        details="It is worse on exertion and settles with rest.|Home BP readings are around 150/95.",
        history="high blood pressure|high cholesterol|a mild heart attack in 2019",
        fears="a heart attack|a blockage",
        meds="amlodipine 5 mg|atorvastatin 10 mg|aspirin 75 mg",
        urgent="Last night the chest pain was severe.",
        causes="The {noun} should be taken seriously, as the cause can be reduced blood flow to the heart.|"
        "Your {noun} may be related to uncontrolled blood pressure or a rhythm disturbance.",
        advice="Reduce salt, avoid smoking and walk 30 minutes a day once the heart is checked.|Do not stop your "
        "BP tablets on your own.",
        tests="I suggest an ECG, a 2D echo and a treadmill test.|A lipid "
        "profile and thyroid tests should also be done.",
    ),
    "dermatology": _bank(
        "dermatologist",
        "",
        "16-65",
        symptoms="itchy red patches on the arms and neck=itchy patches|pus-filled pimples on the face=acne|"
        "white spots on the hands=white spots|hair falling out in round patches=patchy hair loss",
        details="The itching is worse at night.|It spreads when scratched.",
        history="eczema|dandruff|a thyroid problem",
        fears="a fungal infection|psoriasis",
        meds="a steroid cream|cetirizine|an antifungal powder",
        urgent="Now there is severe swelling of the lips as well.",
        causes="The {noun} may be an inflammatory skin condition, which is treatable.|The {noun} could be linked "
        "to hormones, an infection or an allergy.",
        advice="Avoid steroid creams without a prescription, they worsen fungal infections.|Keep the area dry and "
        "wear loose cotton clothes.",
        tests="A skin scraping (KOH mount) will show if it is fungal.|"
        "A blood count and thyroid tests may help find the cause.",
    ),
    "gastroenterology": _bank(
        "gastroenterologist",
        "",
        "18-75",
        symptoms="burning pain in the upper abdomen after meals=upper abdominal pain|bloating and gas=bloating|"
        "loose motions five times a day=loose motions|sour belching at night=acid reflux",
        details="It is worse after spicy food.|The appetite has gone down.",
        history="gastritis|piles|gall stones",
        fears="an ulcer|appendicitis",
        meds="pantoprazole 40 mg|an antacid syrup|domperidone",
        urgent="This morning there was bleeding with the stool.",
        causes="The {noun} can most likely be explained by gastritis.|Your {noun} could be caused "
        "by an intestinal infection or irritable bowel syndrome.",
        advice="Eat small, frequent meals and do not lie down for two hours after food.|Avoid tea, coffee, "
        "alcohol and smoking for now.",
        tests="An ultrasound of the abdomen and a stool test should be "
        "done.|If it continues, an upper GI endoscopy will help.",
    ),
    "neurology": _bank(
        "neurologist",
        "",
        "18-78",
        symptoms="one-sided headaches with nausea=headache|tingling and numbness in both feet=numbness|"
        "dizziness on getting up from bed=dizziness|forgetting things often=memory problems",
        details="Bright light makes it worse.|Sleep has been poor lately.",
        history="migraine|type 2 diabetes|a head injury",
        fears="a brain tumour|a stroke",
        meds="paracetamol|pregabalin 75 mg|betahistine",
        urgent="Yesterday there was a sudden severe headache with vomiting.",
        causes="The {noun} could have a cause such as migraine or a nerve problem.|Your {noun} can be caused by nerve "
        "involvement from diabetes or low vitamin B12.",
        advice="Keep regular sleep and do not skip meals.|Do not overuse painkillers, that itself causes daily "
        "headaches.",
        tests="An MRI of the brain may be needed if there is any weakness.|Please get "
        "vitamin B12, sugar and thyroid levels checked.",
    ),
    "orthopedics": _bank(
        "orthopedic surgeon",
        "",
        "20-80",
        symptoms="lower back pain going down the right leg=back pain|knee pain on climbing stairs=knee pain|"
        "neck and shoulder stiffness=neck pain|heel pain in the morning=heel pain",
        details="It is worst in the morning.|Sitting for long makes it worse.",
        history="osteoarthritis|a slipped disc|gout",
        fears="a fracture|arthritis",
        meds="diclofenac gel|aceclofenac 100 mg|calcium",
        urgent="After a fall there is severe pain and swelling.",
        causes="The {noun} can come from muscle spasm or early wear of the joint.|Your {noun} may come "
        "from a nerve compressed in the spine.",
        advice="Physiotherapy and daily stretching will help a lot.|Avoid lifting heavy weights for a few weeks.",
        tests="An X-ray of the area is the first step.|If the pain persists, an MRI will show the discs and ligaments.",
    ),
    "pediatrics": _bank(
        "pediatrician",
        "",
        "2-12",
        symptoms="fever and cough=fever|a running nose and poor feeding=cold|vomiting after every meal=vomiting|"
        "a red rash all over the body=rash",
        details="The fever goes up to 101 F at night.|The child is playful in between.",
        history="wheezing|frequent throat infections|a milk allergy",
        fears="pneumonia|dengue",
        meds="paracetamol syrup|an antibiotic syrup|ORS",
        urgent="Today the child is very drowsy and the fever is high.",
        causes="In a child this age the {noun} will most often be viral and settle in a few days.|The {noun} "
        "could be due to a throat or chest infection.",
        advice="Give plenty of fluids and light home-made food.|Give paracetamol by the child's weight, at most "
        "four times a day.",
        tests="A blood count and urine test will help if the fever lasts beyond "
        "three days.|A chest X-ray may be needed if breathing is fast.",
    ),
    "gynecology": _bank(
        "gynecologist",
        "F",
        "17-55",
        symptoms="irregular periods=irregular periods|lower abdominal pain during periods=period pain|"
        "white discharge with itching=vaginal discharge|a missed period and nausea=missed period",
        details="A home pregnancy test was negative.|The flow is heavier than before.",
        history="polycystic ovaries|fibroids|thyroid disease",
        fears="a pregnancy|PCOS",
        meds="mefenamic acid|a hormone pill|folic acid",
        urgent="Since yesterday there is heavy bleeding with clots.",
        causes="The {noun} can come from a hormonal imbalance such as PCOS or a thyroid problem.|Your {noun} "
        "could be due to an infection, which is easily treated.",
        advice="Keep a healthy weight with regular exercise.|Keep a record of your cycle dates.",
        tests="An ultrasound of the pelvis and a thyroid test are advised.|A serum beta hCG will rule out pregnancy.",
    ),
    "psychiatry": _bank(
        "psychiatrist",
        "",
        "16-70",
        symptoms="constant worry and restlessness=anxiety|low mood and no interest in anything=low mood|"
        "difficulty falling asleep=sleeplessness|sudden episodes of fear=panic attacks",
        details="It is affecting work.|There is a lot of stress at home.",
        history="depression|alcohol use|panic disorder",
        fears="depression|a mental illness",
        meds="escitalopram 10 mg|clonazepam|a sleeping tablet",
        urgent="The panic attack yesterday was so severe that we went to the emergency.",
        causes="The {noun} may point to an anxiety disorder, which is very treatable.|Your {noun} may be "
        "a sign of depression.",
        advice="Counselling along with medicines gives the best results.|Do not stop the medicines suddenly.",
        tests="Thyroid tests should be done to rule out physical causes.|An assessment with a psychologist "
        "will help plan therapy.",
    ),
    "pulmonology": _bank(
        "pulmonologist",
        "",
        "18-80",
        symptoms="a dry cough=dry cough|wheezing at night=wheezing|cough with yellow phlegm=cough|"
        "shortness of breath while walking=shortness of breath",
        details="Dust and cold air trigger it.|It is worse early in the morning.",
        history="asthma|old tuberculosis|smoking",
        fears="tuberculosis|asthma",
        meds="an inhaler|montelukast|azithromycin",
        urgent="There was blood in the phlegm this morning.",
        causes="The {noun} may point to allergic bronchitis or asthma.|Your {noun} may be due to a chest infection.",
        advice="Avoid dust, smoke and cold drinks.|Please stop smoking completely.",
        tests="A chest X-ray and "
        "a lung function test are advised.|A sputum test for TB is needed if it lasts three weeks.",
    ),
    "ent": _bank(
        "ENT specialist",
        "",
        "10-75",
        symptoms="pain in the right ear=ear pain|a blocked nose with forehead pain=sinus congestion|"
        "a sore throat and pain on swallowing=sore throat|ringing in the ears=tinnitus",
        details="There is a discharge from the ear.|Hot drinks give some relief.",
        history="tonsillitis|sinusitis|a deviated septum",
        fears="a sinus infection|a hole in the eardrum",
        meds="amoxicillin|a nasal spray|ear drops",
        urgent="There is now bleeding from the nose that took long to stop.",
        causes="The {noun} can most likely be explained by an infection of the middle ear or sinuses.|Your {noun} may "
        "be due to allergy or a viral infection.",
        advice="Do warm saline gargles and steam inhalation.|Avoid putting anything into the ear.",
        tests="An ENT examination with an otoscope is needed.|An X-ray of the sinuses may help.",
    ),
    "urology": _bank(
        "urologist",
        "M",
        "18-80",
        symptoms="burning while passing urine=burning urination|frequent urination at night=frequent "
        "urination|pain in the right flank=flank pain|pain in the left testicle=testicular pain",
        details="There is a feeling of incomplete emptying.|The pain comes in waves.",
        history="kidney stones|an enlarged prostate|diabetes",
        fears="a kidney stone|a prostate problem",
        meds="tamsulosin|nitrofurantoin|an alkaliser syrup",
        urgent="This morning there was blood in the urine.",
        causes="The {noun} may point to a urinary tract infection.|Your {noun} could be due to a stone in "
        "the kidney or ureter.",
        advice="Drink at least three litres of water daily.|Reduce tea, coffee and alcohol in the evening.",
        tests="A urine routine and culture test is needed.|An ultrasound of the kidneys and bladder is advised.",
    ),
}
# Sentences and phrases shared by all specialties.
GENERIC_DETAILS = [
    "It comes and goes.",
    "There is no fever.",
    "It started suddenly.",
    "It is getting worse.",
    "There is no other medical problem.",
    "We live in a small town far from a hospital.",
    "No allergies to medicines.",
    "The weight has not changed.",
]
GENERIC_ADVICE = [
    "Avoid self-medication and take the full course of any prescribed medicine.",
    "Drink enough water, sleep well and avoid stress as far as possible.",
]
GENERIC_URGENT = [
    "Today it became severe and we are wondering whether to go to the emergency.",
    "It is so severe now, is this an emergency?",
]
OPENERS = [
    "Hi doctor, ",
    "Hello doctor, ",
    "Hi, ",
    "Hello, ",
    "Dear doctor, ",
    "Respected sir, ",
    "",
    "hi. ",
    "Good evening doctor. ",
    "Sir, ",
    "Hello Dr, ",
    "Dear sir/madam, ",
]
SELF_INTROS = [
    "I am a {age} year old {noun}",
    "I'm {age} years old ({adj})",
    "I am {age}yrs {adj}",
    "I am {adj}, {age} years of age",
    "{age} year old {noun} here",
]
SELF_SYMPTOM = [
    "{intro} and I have had {sym} for {dur}.",
    "{intro}. For the past {dur} I have been having {sym}.",
    "{intro}. I have {sym} since {dur}.",
    "{intro} and I am suffering from {sym} for about {dur} now.",
]
OTHER_SYMPTOM = [
    "My {rel} is {age} years old and has had {sym} for {dur}.",
    "My {rel} ({age} yrs) has {sym} for {dur} now.",
    "I am writing about my {rel}, who is {age}. {S} has been having {sym} for the last {dur}.",
    "My {age} year old {rel} is suffering from {sym} since {dur}.",
]
DURATIONS = [
    "2 days",
    "3 days",
    "4 days",
    "a week",
    "10 days",
    "2 weeks",
    "three weeks",
    "a month",
    "2 months",
    "3 months",
    "6 months",
    "a year",
    "two years",
]
HISTORY = [
    "{S} {have} a history of {h}.",
    "{S} {be} a known case of {h}.",
    "Past history: {h}.",
    "There is a history of {h} as well.",
]
MEDS = [
    "{S} {be} taking {m} but there is not much relief.",
    "The local doctor prescribed {m}.",
    "Currently on {m}.",
    "{S} tried {m} for a few days.",
    "We took {m} from the chemist, it helped a little.",
]
ASKS = [
    "What could be the cause?",
    "Is this something serious?",
    "What should be done?",
    "Do we need any tests?",
    "Please advise.",
    "Should we see a specialist?",
    "Could this be {fear}?",
    "Is it {fear}?",
    "I am scared it might be {fear}.",
    "What is the treatment for this?",
]
CLOSINGS = ["Thank you.", "Thanks in advance.", "Please help.", "", "thanks", "Kindly reply soon.", "Waiting."]
GREETINGS = [
    "Hello, Thanks for your query.",
    "Hi, Thanks for writing in.",
    "Hello, I have gone through your query.",
    "Hi, Thank you for posting your query.",
    "Dear friend, thanks for the question.",
    "Hello, I understand your concern.",
]
SIGNOFFS = [
    "Hope this helps. Take care.",
    "Wish you good health.",
    "Take care.",
    "Regards.",
    "Hope I have answered your query. Let me know if I can assist you further.",
]
URGENT_ADVICE = "Since the symptoms are severe, please go to the nearest emergency department without delay."

# Planted faults, spread evenly through the file in this order (see `planted_noise`).
NOISE = [
    "artefact_welcome",
    "html_question",
    "exact_duplicate",
    "empty_answer",
    "near_duplicate",
    "pii_question",
    "artefact_regards",
    "greeting_only",
    "exact_duplicate",
    "html_answer",
    "brief_answer",
    "artefact_thanks",
    "missing_output",
    "near_duplicate",
    "url_answer",
    "numeric_input",
    "artefact_forum",
    "exact_duplicate",
]
# The anonymiser's phrases; they replace the answer's own greeting (`body`) or follow the whole answer (`full`).
ARTEFACTS = {
    "artefact_welcome": "Hi, welcome to Chat Doctor. {body}",
    "artefact_regards": "{full} Regards : Chat Doctor.",
    "artefact_thanks": "Thanks for asking at Chat Doctor. {body}",
    "artefact_forum": "Hello and welcome to Chat Doctor forum. {body}",
}
GREETING_REPLY = (
    "Hello, Thanks for your query. Please describe your symptoms, how long you have had them and any "
    "medicines you take, so that I can guide you. Take care."
)


def dedup_key(text: str) -> str:
    """Lower-cased, punctuation and extra spaces removed: how duplicate questions are recognised."""
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def _person(rng: random.Random, spec: dict[str, Any]) -> dict[str, str]:
    """The patient: age, sex words, pronouns and, when someone asks for a relative or child, the relation."""
    lo, hi = spec["ages"]
    female = spec["sex"] == "F" or (spec["sex"] != "M" and rng.random() < 0.5)
    p = {
        "age": str(rng.randint(lo, hi)),
        "noun": rng.choice(["woman", "lady"] if female else ["man", "guy"]),
        "adj": "female" if female else "male",
        "rel": "",
    }
    if spec["specialist"] == "pediatrician":
        p["rel"] = "daughter" if female else "son"
    elif rng.random() < 0.25:
        p["rel"] = rng.choice(["mother", "wife", "sister"] if female else ["father", "husband", "brother"])
    else:
        return {**p, "S": "I", "have": "have", "be": "am"}
    return {**p, "S": "She" if female else "He", "have": "has", "be": "is"}


def _question(rng: random.Random, spec: dict[str, Any], urgent: bool) -> tuple[str, str]:
    """A patient's question and the symptom's short name (for the answer)."""
    p, (sym, noun) = _person(rng, spec), rng.choice(spec["symptoms"])
    dur = rng.choice(DURATIONS[:8] if spec["specialist"] == "pediatrician" else DURATIONS)  # up to a month
    if p["rel"]:
        first = rng.choice(OTHER_SYMPTOM).format(sym=sym, dur=dur, **p)
    else:
        first = rng.choice(SELF_SYMPTOM).format(intro=rng.choice(SELF_INTROS).format(**p), sym=sym, dur=dur)
    parts = [rng.choice(OPENERS) + first, *rng.sample(spec["details"] + GENERIC_DETAILS, rng.randint(0, 3))]
    if rng.random() < 0.6:
        parts.append(rng.choice(HISTORY).format(h=rng.choice(spec["history"]), **p))
    if rng.random() < 0.6:
        parts.append(rng.choice(MEDS).format(m=rng.choice(spec["meds"]), **p))
    if urgent:
        parts.append(rng.choice(spec["urgent"] + GENERIC_URGENT))
    parts += [rng.choice(ASKS).format(fear=rng.choice(spec["fears"])), rng.choice(CLOSINGS)]
    text = " ".join(x for x in parts if x)
    return (text.lower() if rng.random() < 0.12 else text), noun  # many real questions are all lower case


def _answer(rng: random.Random, spec: dict[str, Any], noun: str, urgent: bool) -> str:
    """A doctor's reply: greeting, likely cause, advice or tests, a referral and a sign-off."""
    body = [rng.choice(spec["causes"]).format(noun=noun)]
    body += rng.sample(spec["advice"] + spec["tests"] + GENERIC_ADVICE, rng.randint(1, 3))
    if rng.random() < 0.5:
        body.append(f"Please consult a {spec['specialist']} if the symptoms persist.")
    greeting = [rng.choice(GREETINGS)] if rng.random() < 0.9 else []
    return " ".join(greeting + ([URGENT_ADVICE] if urgent else []) + body + [rng.choice(SIGNOFFS)])


def _record(question: Any, answer: Any = None, with_output: bool = True) -> dict[str, Any]:
    rec = {"instruction": INSTRUCTION, "input": question}
    return {**rec, "output": answer} if with_output else rec


def _fresh(rng: random.Random, seen: set[str]) -> dict[str, Any]:
    """A new clean record whose question is distinct (by `dedup_key`) from every one made so far."""
    while True:
        spec, urgent = SPECIALTIES[rng.choice(sorted(SPECIALTIES))], rng.random() < 0.15
        question, noun = _question(rng, spec, urgent)
        answer = _answer(rng, spec, noun, urgent)
        sentences = len(re.split(r"(?<=[.!?])\s+", answer))
        if (
            80 <= len(question) <= 600
            and 150 <= len(answer) <= 700
            and 2 <= sentences <= 6
            and dedup_key(question) not in seen
        ):
            seen.add(dedup_key(question))
            return _record(question, answer)


def _noise(kind: str, rng: random.Random, seen: set[str], clean: list[dict[str, Any]]) -> dict[str, Any]:
    """One planted faulty record; duplicates copy an earlier clean record."""
    if kind == "exact_duplicate":
        return dict(rng.choice(clean))
    if kind == "near_duplicate":  # same question up to case, punctuation and white space
        src = rng.choice(clean)
        q = re.sub(r"\s+", "  ", src["input"].upper() if src["input"].islower() else src["input"].lower())
        return _record(" " + q.rstrip(".!?") + " ??", src["output"])
    rec = _fresh(rng, seen)
    q, a = rec["input"], rec["output"]
    first, _, rest = a.partition(". ")
    body = next((a[len(g) + 1 :] for g in GREETINGS if a.startswith(g + " ")), a)
    variants = {
        "empty_answer": (q, ""),
        "brief_answer": (q, "Brief"),
        "greeting_only": ("Hello sir", GREETING_REPLY),
        "html_question": (q.replace(". ", ".<br>", 1) + "<br>Thanks &amp; regards", a),
        "html_answer": (f"<p>{q}</p>", f"<p>{first}.&nbsp;{rest}</p>".replace(" the ", " the&nbsp;", 1)),
        "pii_question": (q + " You can mail me at priya.verma84@example.com or call +1 555 014 2298.", a),
        "url_answer": (q, a + " Please read https://www.example.org/patient-leaflets for more information."),
        "numeric_input": (20231104, a),
        **{k: (q, template.format(body=body, full=a)) for k, template in ARTEFACTS.items()},
    }
    if kind == "missing_output":
        return _record(q, with_output=False)
    if kind not in variants:
        raise ValueError(f"unknown noise kind {kind!r}")
    return _record(*variants[kind])


def planted_noise(n: int) -> list[tuple[int, str]]:
    """(index, kind) of every planted faulty record in a sample of `n` records."""
    if n < 2 * len(NOISE):
        raise ValueError(f"n must be at least {2 * len(NOISE)} to hold the {len(NOISE)} planted records, got {n}.")
    return [((i + 1) * n // (len(NOISE) + 1), kind) for i, kind in enumerate(NOISE)]


def generate(n: int = 400, seed: int = 0) -> list[dict]:
    """`n` records in all: synthetic questions and answers, with the `NOISE` records at fixed positions."""
    rng, noise, seen = random.Random(seed), dict(planted_noise(n)), set()
    clean: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for i in range(n):
        if i in noise:
            records.append(_noise(noise[i], rng, seen, clean))
        else:
            clean.append(_fresh(rng, seen))
            records.append(clean[-1])
    return records


def dumps(records: list[dict]) -> str:
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def write_sample(path: str | Path, n: int = 400, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(generate(n, seed)), encoding="utf-8")
    return path


def readme(path: Path, n: int, seed: int) -> str:
    """The README that sits next to the sample: what it is, the planted noise, how to regenerate."""
    by_kind: dict[str, list[int]] = {}
    for i, kind in planted_noise(n):
        by_kind.setdefault(kind, []).append(i)
    rows = "\n".join(f"| {kind} | {len(ix)} | {', '.join(map(str, ix))} |" for kind, ix in by_kind.items())
    return f"""# Embedded demo dataset

`{path.name}`: {n} records in the layout of HealthCareMagic-100k.json (`instruction`; `input`, the patient's
question; `output`, the doctor's answer), the default `data.source`.

**Synthetic, not real patient data**: composed from templates and sentence banks by `python tools/make_sample.py`
(tools/make_sample.py, seed {seed}) over {len(SPECIALTIES)} specialties ({", ".join(sorted(SPECIALTIES))});
some questions carry urgency words (severe, emergency, bleeding, chest pain).

## Planted noise ({len(NOISE)} records at fixed 0-based indices, for the cleaning stage)

| kind | count | indices |
|---|---|---|
{rows}

Duplicates copy an earlier record; near-duplicates change only the question's case, punctuation and spaces.
`artefact_*` answers carry the anonymiser's "Chat Doctor" phrases; `html_*` hold `<br>`, `<p>`, `&amp;`,
`&nbsp;`; `pii_question` an e-mail address and a phone number; `url_answer` a URL.

## Regenerate

    python tools/make_sample.py --out {DEFAULT_OUT} --n {n} --seed {seed}

Byte-identical on every run: sha256 `{hashlib.sha256(path.read_bytes()).hexdigest()}`.
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON file to write (README.md goes next to it).")
    ap.add_argument("--n", type=int, default=400, help="Number of records, planted noise included.")
    ap.add_argument("--seed", type=int, default=0, help="Random seed.")
    args = ap.parse_args(argv)
    path = write_sample(args.out, args.n, args.seed)
    (path.parent / "README.md").write_text(readme(path, args.n, args.seed), encoding="utf-8")
    print(f"wrote {args.n} records to {path} and {path.parent / 'README.md'}")


if __name__ == "__main__":
    main()
