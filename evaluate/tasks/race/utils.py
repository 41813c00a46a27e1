"""RACE as lm-eval scores it: one document per article; the earlier questions of the article are shown
answered, the last one is asked, and its four options are the choices."""
import ast

LETTER = {"A": 0, "B": 1, "C": 2, "D": 3}


def _problems(doc):
    return ast.literal_eval(doc["problems"]) if isinstance(doc["problems"], str) else doc["problems"]


def _answer_text(problem):
    return problem["options"][LETTER[problem["answer"]]]


def doc_to_text(doc):
    problems = _problems(doc)
    text = "Article: " + doc["article"] + "\n\n"
    for p in problems[:-1]:
        if p["question"][-6:] == "  _  .":  # cloze question: fill the blank
            text += p["question"][:-5] + _answer_text(p) + "\n"
        else:
            text += "Question: " + p["question"] + "\n" + "Answer: " + _answer_text(p) + "\n"
    return text + problems[-1]["question"]


def doc_to_choice(doc):
    return list(_problems(doc)[-1]["options"][:4])


def doc_to_target(doc):
    return LETTER[_problems(doc)[-1]["answer"]]
