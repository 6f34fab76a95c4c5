"""SARIF 2.1.0 output of ``moecoder review`` (valid against the OASIS schema).

One run; the driver lists the rules; each finding is a result with its level, a region
(line, columns, the code line as snippet), ``partialFingerprints`` that survive line
shifts (rule + path + function + the line's text), a ``fix`` when there is one
(replace the line, or insert the suggested docstring) and ``properties`` with the
confidence, the function and the model's reasoning. Files that were skipped become
``toolExecutionNotifications`` of the invocation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from assistant.review import Finding, Report

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INFO_URI = "https://github.com/moecoder/moecoder"

RULES: dict[str, dict[str, str]] = {
    "MC001": {
        "name": "PossibleBug",
        "short": "Possible bug found by the model",
        "full": "The model reviewed the function and flagged a line as likely wrong (for example an "
                "off-by-one, a wrong comparison or a misused variable). Confidence combines the model's "
                "answer probability with how surprising the line is to the model.",
        "level": "warning",
    },
    "MC002": {
        "name": "MissingDocstring",
        "short": "Public function without a docstring",
        "full": "A public function has no docstring; the fix inserts a docstring suggested by the model "
                "in the file's docstring style.",
        "level": "note",
    },
}


def fingerprint(f: Finding) -> str:
    key = "\0".join([f.rule, f.path, f.function, (f.code or "").strip()])
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _uri(path: str) -> str:
    p = Path(path)
    return p.as_posix() if not p.is_absolute() else p.as_uri()


def _result(f: Finding, rule_index: dict[str, int], base: str | None) -> dict[str, Any]:
    loc: dict[str, Any] = {"uri": _uri(f.path)}
    if base and not Path(f.path).is_absolute():
        loc["uriBaseId"] = "SRCROOT"
    code = f.code or ""
    region: dict[str, Any] = {"startLine": f.line, "endLine": f.end_line or f.line}
    if code.strip():
        region["startColumn"] = len(code) - len(code.lstrip()) + 1
        region["endColumn"] = len(code.rstrip()) + 1
        region["snippet"] = {"text": code}
    res: dict[str, Any] = {
        "ruleId": f.rule,
        "ruleIndex": rule_index[f.rule],
        "level": f.level,
        "message": {"text": f.message},
        "locations": [{"physicalLocation": {"artifactLocation": loc, "region": region},
                       "logicalLocations": [{"name": f.function.rsplit(".", 1)[-1],
                                             "fullyQualifiedName": f.function, "kind": "function"}]}],
        "partialFingerprints": {"moecoderFindingHash/v1": fingerprint(f)},
        "properties": {"confidence": f.confidence, "function": f.function},
    }
    if f.reasoning:
        res["properties"]["reasoning"] = f.reasoning
    if f.fix is not None:
        if f.rule == "MC002":  # insert before the body's first line
            deleted = {"startLine": f.fix_line, "startColumn": 1, "endLine": f.fix_line, "endColumn": 1}
            text = f.fix if f.fix.endswith("\n") else f.fix + "\n"
            desc = "Insert the suggested docstring"
        else:  # replace the whole line
            deleted = {"startLine": f.line, "startColumn": 1, "endLine": f.line,
                       "endColumn": len(code) + 1}
            text = f.fix
            desc = "Replace the line"
        res["fixes"] = [{"description": {"text": desc}, "artifactChanges": [
            {"artifactLocation": dict(loc), "replacements": [{"deletedRegion": deleted,
                                                              "insertedContent": {"text": text}}]}]}]
    return res


def to_sarif(report: Report) -> dict[str, Any]:
    from assistant import __version__

    rule_ids = list(RULES)
    rule_index = {r: i for i, r in enumerate(rule_ids)}
    rules = [{
        "id": r,
        "name": RULES[r]["name"],
        "shortDescription": {"text": RULES[r]["short"]},
        "fullDescription": {"text": RULES[r]["full"]},
        "defaultConfiguration": {"level": RULES[r]["level"]},
        "help": {"text": RULES[r]["full"]},
    } for r in rule_ids]
    base = report.root
    notes = [{
        "level": "warning" if s.explicit else "note",
        "message": {"text": f"{s.path}: skipped: {s.reason}"},
        "locations": [{"physicalLocation": {"artifactLocation": {"uri": _uri(s.path)}}}],
    } for s in report.skipped]
    if report.interrupted:
        notes.append({"level": "error", "message": {"text": "interrupted: results are partial"}})
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "moecoder", "version": __version__, "semanticVersion": __version__,
                            "informationUri": INFO_URI, "rules": rules}},
        "invocations": [{"executionSuccessful": not report.interrupted and not report.fatal,
                         "toolExecutionNotifications": notes}],
        "results": [_result(f, rule_index, base) for f in report.findings],
        "columnKind": "unicodeCodePoints",
        "properties": {"filesReviewed": report.files_reviewed, "functionsReviewed": report.functions_reviewed,
                       "model": report.model or "shipped"},
    }
    if base:
        run["originalUriBaseIds"] = {"SRCROOT": {"uri": Path(base).resolve().as_uri() + "/"}}
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}
