"""Per-subject row filters for the local MMLU files, which hold every subject in one file.

`!function utils.<subject>` resolves through the module __getattr__ below to a process_docs that keeps
that subject's rows, in file order (so first_n few-shot picks the same dev rows as upstream).
"""
import functools


def _keep(subject, dataset):
    return dataset.filter(lambda doc: doc["subject"] == subject)


def __getattr__(subject):
    if subject.startswith("__"):
        raise AttributeError(subject)
    return functools.partial(_keep, subject)
