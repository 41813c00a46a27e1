"""WinoGrande as lm-eval scores it: the context is "sentence up to the blank, with option k", the
gold index picks the option (answer "1"/"2"), and the scored continuation is the text after the blank."""


def doc_to_text(doc):
    return int(doc["answer"]) - 1


def doc_to_target(doc):
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1:].strip()


def doc_to_choice(doc):
    head = doc["sentence"][:doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]
