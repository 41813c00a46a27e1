"""HellaSwag documents as lm-eval builds them: query = "activity: ctx_a Ctx_b", WikiHow artefacts removed."""
import re


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # bracketed WikiHow markers
    return text.replace("  ", " ")


def _doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": clean(doc["activity_label"] + ": " + ctx),
            "choices": [clean(e) for e in doc["endings"]], "gold": int(doc["label"])}


def process_docs(dataset):
    return dataset.map(_doc)
