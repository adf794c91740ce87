"""Deliberate breaks and the tests that must catch them: each break is applied alone to a scratch copy of
the tree, the named tests run there, and the break counts as caught when they fail.

    .venv/bin/python scripts/mutants.py              # every break
    .venv/bin/python scripts/mutants.py grpo peft    # the breaks whose name contains one of the words
    .venv/bin/python scripts/mutants.py --list

A break is (name, file, the exact text to change, what it becomes, the pytest ids that must fail). The text
must occur exactly once in the file, so a refactor that moves it makes this script say so instead of
silently testing nothing. It is a tool for developers, not part of the test suite's time budget: add an
entry for every feature and for every test written because a break went unnoticed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Break:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


BREAKS = [
    Break("peft: per-expert target_modules (peft 0.22 drops them)", "jaxft/lora.py",
          'return sorted({ROUTED_EXPERT.sub(r".mlp.experts.\\1", n) for n in names})', "return names",
          ("tests/test_lora.py::test_causal_lm_lora_looped[deepseek-v3]",)),
    Break("peft: dense-MLP adapters written under peft 0.21", "jaxft/lora.py",
          "if dense and peft is not None and peft < PEFT_KEEPS_DENSE_MLP:", "if False:",
          ("tests/test_lora.py::test_deepseek_adapter_under_peft_0_21",)),
    Break("grpo: ratio not clipped", "jaxft/objectives/grpo_loss.py",
          "clipped = jnp.clip(ratio, 1 - g.epsilon, 1 + eps_high)", "clipped = ratio",
          ("tests/test_grpo_loss.py::test_loss_equals_trl",)),
    Break("grpo: advantages not divided by the std", "jaxft/objectives/grpo_loss.py",
          "        adv = adv / (std + np.float32(ADV_EPS))", "        adv = adv",
          ("tests/test_grpo_loss.py::test_advantages_equal_trl",)),
    Break("grpo: KL sign flipped", "jaxft/objectives/grpo_loss.py",
          "        d = ref - logp\n", "        d = logp - ref\n",
          ("tests/test_grpo_loss.py::test_loss_equals_trl",)),
    Break("grpo: loss over prompt tokens too", "jaxft/objectives/grpo.py",
          "        loss[r, len(p):len(p) + n] = int(keep[r])", "        loss[r, :len(p) + n] = int(keep[r])",
          ("tests/test_grpo_loss.py::test_train_rows_and_spans",)),
    Break("grpo: log-probs read one position late", "jaxft/objectives/grpo_loss.py",
          "    return token_logps(model, h, jnp.pad(ids[:, 1:], ((0, 0), (0, 1))), chunk_tokens)",
          "    return token_logps(model, h, ids, chunk_tokens)",
          ("tests/test_grpo_loss.py::test_token_logps_equal_transformers",)),
    Break("bad input: export target inside (or equal to) a run directory", "jaxft/hf/export.py",
          "run = next((d for t in (spelled, real) for d in (t, *t.parents) if is_run_dir(d)), None)", "run = None",
          ("tests/test_bad_inputs.py::test_bad_input[export-target-inside-the-run]",
           "tests/test_bad_inputs.py::test_bad_input[export-target-inside-another-run]",
           "tests/test_bad_inputs.py::test_bad_input[export-target-is-another-run]")),
    Break("bad input: export target holding a run directory", "jaxft/hf/export.py",
          'held = next((p.parent for p in out.rglob("config.yaml") if is_run_dir(p.parent)), None)', "held = None",
          ("tests/test_bad_inputs.py::test_bad_input[export-target-holds-a-run]",)),
    Break("bad input: export --adapter written into OUT in place", "jaxft/cli.py",
          "with staged_folder(out) if jax.process_index() == 0 else nullcontext(out) as folder:",
          "with nullcontext(out) as folder:",
          ("tests/test_bad_inputs.py::test_adapter_export_replaces_the_whole_folder",)),
    Break("bad input: data.max_length past a learned position table", "jaxft/cli.py",
          "data.max_length > positions:", "False:",
          ("tests/test_bad_inputs.py::test_bad_input[gpt2-max-length-past-n-positions]",
           "tests/test_bad_inputs.py::test_bad_input[bert-max-length-past-max-position-embeddings]")),
    Break("bad input: RUN/.lock followed through a symbolic link", "jaxft/train/run.py",
          "os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW", "os.O_RDWR | os.O_CREAT",
          ("tests/test_bad_inputs.py::test_bad_input[lock-is-a-symbolic-link]",
           "tests/test_bad_inputs.py::test_bad_input[lock-is-a-dangling-link]")),
    Break("bad input: generate --prompt empty", "jaxft/cli.py", "if not args.prompt:", "if False:",
          ("tests/test_bad_inputs.py::test_bad_input[generate-empty-prompt]",)),
    Break("grpo: a checkpoint inside a rollout's steps forgets its batch", "jaxft/objectives/grpo.py",
          "            state[\"rollout\"] = _pack(self.buffer)", "            pass",
          ("tests/test_grpo_train.py::test_grpo_resume_is_bitwise",)),
    Break("grpo: old log-probs not stored (mu > 1 trains on ratio 1)", "jaxft/objectives/grpo.py",
          "        if g.num_iterations > 1:   # the old policy", "        if False:   # the old policy",
          ("tests/test_grpo_train.py::test_grpo_resume_is_bitwise",)),
    Break("grpo: a failed rollout keeps the prompts it drew", "jaxft/objectives/grpo.py",
          "            self.splits[\"train\"].position = position\n", "            pass\n",
          ("tests/test_grpo_train.py::test_a_failing_reward_keeps_the_work_and_resumes_exactly",)),
    Break("loop: no checkpoint when the next batch cannot be made", "jaxft/train/loop.py",
          "            if self.step and self.ckpts.latest_step() != self.step:", "            if False:",
          ("tests/test_grpo_train.py::test_a_failing_reward_keeps_the_work_and_resumes_exactly",)),
    Break("generate: top-k ignored", "jaxft/generate.py",
          "    if top_k and top_k < logits.shape[-1]:", "    if False:",
          ("tests/test_generate.py::test_sampling_follows_the_tempered_nucleus_distribution",)),
    Break("generate: inverse CDF picks the token before", "jaxft/generate.py",
          "jnp.sum(cdf <= u, axis=-1)", "jnp.maximum(jnp.sum(cdf <= u, axis=-1) - 1, 0)",
          ("tests/test_generate.py::test_sampling_follows_the_tempered_nucleus_distribution",)),
    Break("distill: classification teacher given the input ids alone", "jaxft/objectives/distill.py",
          'teacher_BC = teacher(batch["input_ids"], **inputs)', 'teacher_BC = teacher(batch["input_ids"])',
          ("tests/test_distill.py::test_classification_teacher_sees_the_attention_mask_and_token_types",)),
    Break("distill: causal-LM teacher given the input ids alone", "jaxft/objectives/distill.py",
          'teacher_BTV = teacher(ids, attention_mask=batch["attention_mask"], segment_ids=seg)',
          "teacher_BTV = teacher(ids)",
          ("tests/test_distill.py::test_causal_lm_teacher_sees_the_padding_and_the_packed_documents",)),
    Break("sft: a non-text prompt trained on its repr", "jaxft/data/sft.py",
          "    if value is None or isinstance(value, str):", "    if True:",
          ("tests/test_sft.py::test_conversational_prompt_completion_rows_are_rendered_with_the_template",
           "tests/test_bad_inputs.py::test_bad_input[prompt-completion-not-text]")),
    Break("preference: metrics summed without the pair weights", "jaxft/objectives/preference.py",
          "sums = {k: jnp.sum(jax.lax.stop_gradient(v) * w) for k, v in values.items()}",
          "sums = {k: jnp.sum(jax.lax.stop_gradient(v)) for k, v in values.items()}",
          tuple(f"tests/test_preference_losses.py::test_sums_are_weighted_by_the_pair_weights[{k}]"
                for k in ("dpo", "ipo", "simpo", "orpo"))),
    Break("qlora: the loader quantises 0.5 x the kernel", "jaxft/lora.py",
          "quant = QuantKernel(module.kernel.get_value(), kind, axes, input_dims)",
          "quant = QuantKernel(0.5 * module.kernel.get_value(), kind, axes, input_dims)",
          ("tests/test_qlora.py::test_quantised_logits_within_the_code_book_error_of_the_float_model[int8]",
           "tests/test_qlora.py::test_quantised_logits_within_the_code_book_error_of_the_float_model[nf4]")),
    Break("qlora: int8 scales per input channel", "jaxft/lora.py",
          "input_dims = tuple(d - len(rhs) for d, c in enumerate(rhs) if c in lhs)",
          "input_dims = tuple(d - len(rhs) for d, c in enumerate(rhs) if c not in lhs)",
          ("tests/test_qlora.py::test_int8_scales_are_per_output_channel_through_the_loader[looped]",
           "tests/test_qlora.py::test_int8_scales_are_per_output_channel_through_the_loader[scanned]",
           "tests/test_qlora.py::test_quantised_logits_within_the_code_book_error_of_the_float_model[int8]")),
    Break("preference: precomputed reference read back with the sides swapped", "jaxft/objectives/preference.py",
          'values = saved[f"{split}/chosen"], saved[f"{split}/rejected"]',
          'values = saved[f"{split}/rejected"], saved[f"{split}/chosen"]',
          ("tests/test_dpo_train.py::test_precomputed_reference_read_back_equals_a_fresh_reference_pass",)),
    Break("multitask: tasks in another order than the run's read other columns", "jaxft/objectives/multitask.py",
          "        if saved and [n for n in sorted(saved, key=lambda n: saved[n][\"offset\"]) if n in self.names] != \\",
          "        if False and [n for n in sorted(saved, key=lambda n: saved[n][\"offset\"]) if n in self.names] != \\",
          ("tests/test_multitask.py::test_multitask_run_metrics_early_stopping_and_per_task_export",)),
    Break("multitask: a task named .. accepted", "jaxft/config/data.py",
          '        if set(self.name) == {"."}:', "        if False:",
          ("tests/test_multitask.py::test_bad_task_configs_name_the_key",)),
    Break("hostmem: the restarted process restarts again", "jaxft/hostmem.py",
          " or \\\n            RESTARTED in environ:", ":",
          ("tests/test_hostmem.py::test_huge_page_env_leaves_the_process_alone",)),
    Break("lora: an lm_head adapter fused away by the head + cross-entropy path", "jaxft/models/causal.py",
          "if head.bias is None and head.lora is None else None", "if head.bias is None else None",
          ("tests/test_lora.py::test_lm_head_adapter_is_not_fused_into_the_loss",)),
    Break("deepseek: only the MTP module's own tensors skipped, not its decoder layer", "jaxft/models/deepseek.py",
          'rf"model\\.layers\\.{cfg.num_hidden_layers + j}\\..*"',
          'rf"model\\.layers\\.{cfg.num_hidden_layers + j}\\.(eh_proj|enorm|hnorm|embed_tokens|shared_head)\\..*"',
          ("tests/test_deepseek_parity.py::test_mtp_layers_in_checkpoint_are_ignored",)),
    Break("lora parity: qwen3's q/k norm skipped", "jaxft/models/llama.py",
          "q, k = self.q_norm(q), self.k_norm(k)", "q, k = q, k",
          ("tests/test_lora.py::test_causal_lm_lora_looped[qwen3-qk-norm]",
           "tests/test_lora_scanned.py::test_causal_lm_lora_scanned[qwen3-qk-norm]")),
    Break("lora parity: mistral without its sliding window", "jaxft/models/llama.py",
          "sliding = (window is not None,) * L", "sliding = (False,) * L",
          ("tests/test_lora.py::test_causal_lm_lora_looped[mistral-sliding]",
           "tests/test_lora_scanned.py::test_causal_lm_lora_scanned[mistral-sliding]")),
    Break("data: an unreadable tokenization cache entry is fatal", "jaxft/data/tokenize.py",
          "        except Exception as e:  # noqa: BLE001 - a cut, empty or foreign file: a cache entry, made again",
          "        except ZeroDivisionError as e:",
          ("tests/test_data.py::test_an_unreadable_tokenization_cache_entry_is_made_again",)),
    Break("dpo: a cut reference_logps.npz is fatal", "jaxft/objectives/preference.py",
          "            except Exception as e:  # noqa: BLE001 - cut, empty or not an npz: computed again, then rewritten",
          "            except ZeroDivisionError as e:",
          ("tests/test_dpo_train.py::test_precomputed_reference_read_back_equals_a_fresh_reference_pass",)),
    Break("data: the tokenizer fingerprint keeps the last call's truncation", "jaxft/data/tokenize.py",
          'if k not in ("truncation", "padding")}', "}",
          ("tests/test_data.py::test_an_unreadable_tokenization_cache_entry_is_made_again",)),
    Break("export: RUN/export refused like any folder inside the run", "jaxft/hf/export.py",
          "        run = None   # RUN/export: the run directory's own place for exports", "        pass",
          ("tests/test_bad_inputs.py::test_the_runs_own_export_folder_is_accepted",)),
]


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def run_break(b: Break, scratch: Path, python: str) -> tuple[bool, str, float]:
    """Apply `b` to a fresh copy in `scratch`, run its tests there: (caught, last lines, seconds)."""
    if scratch.exists():
        shutil.rmtree(scratch)
    _copy_tree(scratch)
    path = scratch / b.file
    text = path.read_text()
    if text.count(b.old) != 1:
        return False, f"the text to change occurs {text.count(b.old)} times in {b.file}: update this entry", 0.0
    path.write_text(text.replace(b.old, b.new))
    # the copy's jaxft comes first on the path, before the editable install of the real tree
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(scratch), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    run = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                          *b.tests], cwd=scratch, env=env, capture_output=True, text=True)
    tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-3:])
    return run.returncode == 1, tail, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("words", nargs="*", help="run only the breaks whose name contains one of these")
    ap.add_argument("--list", action="store_true", help="list the breaks and exit")
    args = ap.parse_args(argv)
    chosen = [b for b in BREAKS if not args.words or any(w.lower() in b.name.lower() for w in args.words)]
    if args.list:
        for b in chosen:
            print(f"{b.name}\n    {b.file}: {b.old!r} -> {b.new!r}\n    must fail: {' '.join(b.tests)}")
        return 0
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    missed = []
    with tempfile.TemporaryDirectory(prefix="jaxft-mutant-") as tmp:
        for b in chosen:
            caught, tail, seconds = run_break(b, Path(tmp) / "tree", python)
            print(f"{'CAUGHT' if caught else 'MISSED'}  {b.name}  ({seconds:.0f} s)\n    {tail.replace(chr(10), chr(10) + '    ')}",
                  flush=True)
            if not caught:
                missed.append(b.name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} breaks caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
