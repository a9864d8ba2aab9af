"""How close judge selection comes to verifier selection, on the samples a training run would weigh.

    python bench/judge_agreement.py [--teacher noisy] [--prompts 200] [--samples 4]

Serves a toy teacher and the toy judge (each one `potstill serve` process), draws `--samples`
samples per held-out prompt from the teacher at temperature 1 (as `multi-sample` does), scores
every sample with the judge exactly as `--select judge` does (`trainer_client.judges.Judge`, the
toy rubric), and checks each against the true answer with the verifier. Prints the share of
verified samples among the targets each selection trains on (weighted by its weights): `all`
(no selection), `judge` (weights = judge scores), `judge > 0.5` (kept when the judge leans yes),
and `verifier` (1.0 by construction), with the judge's mean score on right and wrong samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from rich.console import Console
from rich.table import Table

from potstill.demo import default_cache_dir
from potstill.toy.arithmetic import JUDGE_NO, JUDGE_RUBRIC, JUDGE_YES, make_rows
from potstill.toy.world import build_teacher
from teacher_service.testing import TeacherProcess
from trainer_client.config import TrainConfig
from trainer_client.data import Row
from trainer_client.judges import Judge
from trainer_client.pool import TeacherPool
from trainer_client.samples import Candidate, PromptGroup
from trainer_client.trainer import judge_spec
from trainer_client.verifiers import verify_integer


async def judged_groups(teacher_url: str, judge_url: str, rows: list[Row], samples: int) -> list[PromptGroup]:
    config = TrainConfig(student="s", data="d", method="multi-sample", teachers=[teacher_url], judges=[judge_url], select="judge",
                         judge_rubrics={"correctness": JUDGE_RUBRIC}, judge_yes=JUDGE_YES, judge_no=JUDGE_NO)
    async with await TeacherPool.connect([f"{teacher_url}#name=teacher", judge_spec(judge_url, 0)]) as pool:
        request = {"prompts": [r.prompt for r in rows], "n": samples, "max_tokens": 6, "temperature": 1.0, "seed": 0}
        answer = await pool.generate("teacher", request)
        groups = [PromptGroup(row, [], [Candidate([], s.text, "teacher") for s in result.samples]) for row, result in zip(rows, answer.results)]
        await Judge(config, pool).score(groups)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="noisy", help="toy teacher whose samples are judged (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--cache-dir", type=str, default=str(default_cache_dir()))
    args = parser.parse_args()
    rows = [Row(**r) for r in make_rows(args.prompts, seed=0, split="eval")]
    with contextlib.ExitStack() as stack:
        teacher = stack.enter_context(TeacherProcess(str(build_teacher(args.teacher, args.cache_dir)), threads=1))
        judge = stack.enter_context(TeacherProcess(str(build_teacher("judge", args.cache_dir)), threads=1))
        groups = asyncio.run(judged_groups(teacher.grpc_url, judge.grpc_url, rows, args.samples))
    scored = [(c.scores["correctness"], verify_integer(c.text, g.row.answer)) for g in groups for c in g.candidates]
    right = [s for s, ok in scored if ok]
    wrong = [s for s, ok in scored if not ok]

    def verified_share(weights: list[float]) -> str:
        total = sum(weights)
        return f"{sum(w for w, (_, ok) in zip(weights, scored) if ok) / total:.1%}" if total else "n/a"

    table = Table("selection", "verified share of the trained-on weight", "samples kept",
                  title=f"{len(scored)} samples of the '{args.teacher}' teacher on {args.prompts} held-out prompts, judged by the toy judge")
    table.add_row("all", verified_share([1.0] * len(scored)), str(len(scored)))
    table.add_row("judge (weights = scores)", verified_share([s for s, _ in scored]), str(len(scored)))
    table.add_row("judge > 0.5", verified_share([float(s > 0.5) for s, _ in scored]), str(sum(s > 0.5 for s, _ in scored)))
    table.add_row("verifier", verified_share([float(ok) for _, ok in scored]), str(len(right)))
    Console().print(table)
    Console().print(f"mean judge score: right samples {sum(right) / max(len(right), 1):.3f}, wrong samples {sum(wrong) / max(len(wrong), 1):.3f}")


if __name__ == "__main__":
    main()
