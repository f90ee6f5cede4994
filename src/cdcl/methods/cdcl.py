"""CDCL (Wu et al., CVPR 2022): supervised CE + confident consistency with ramp-up + entropy minimisation +
cross-patch dense contrastive loss with a cross-image memory bank, on an EMA teacher (PAPER.md).

Every unlabeled term can be switched off from the config (``use_consistency``, ``use_entropy``,
``w_contr=0``, ``patch_filter``, ``pseudo_label_filter``, ``use_bank``) for the paper's ablations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdcl.instances.representations import class_logits, foreground_logits
from cdcl.methods.base import Method, student_forward, teacher_forward
from cdcl.methods.losses import MemoryBank, cross_patch_contrastive, entropy_loss


class CDCL(Method):
    name = "cdcl"

    uses_unlabeled = True

    def __init__(self, cfg, representation: str = "binary") -> None:
        super().__init__(cfg, representation)
        self.bank = MemoryBank(cfg.bank_capacity) if cfg.use_bank else None

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        """Anchor/bank sampling seeded by the step, so resumed runs draw the same pixels."""
        gen = torch.Generator(device=device)
        gen.manual_seed(1_000_003 * step + 17)
        return gen

    def losses(self, student, teacher, labeled, unlabeled, step):
        cfg = self.cfg
        if not self.unlabeled_active(step):
            return self.supervised_only(student, labeled)
        contrast = cfg.w_contr > 0
        t_out = teacher_forward(teacher, unlabeled["weak"], embeddings=contrast)
        lab, unl = student_forward(student, labeled, unlabeled["strong"], embeddings=contrast)
        sup = self.supervised_loss(lab["logits"], labeled)
        terms = {"sup": sup}
        total = sup
        if cfg.use_consistency:
            consistency = self.confident_consistency(unl["logits"], t_out["logits"])
            cons = consistency["cons"] + consistency.get("cons_dist", 0.0)
            total = total + cfg.w_cons * self.ramp(step) * cons
            terms.update(consistency)
        if cfg.use_entropy and cfg.w_ent > 0:
            ent = entropy_loss(self.consistency_logits(unl["logits"]))
            total = total + cfg.w_ent * ent
            terms["ent"] = ent
        if contrast:
            contr, stats = self._contrastive(unl, t_out, step)
            total = total + cfg.w_contr * contr
            terms["contr"] = contr
            terms.update({f"stat/{k}": v for k, v in stats.items()})
        terms["total"] = total
        return terms

    def _label_probs(self, out, size):
        """Class probabilities pooled to the embedding resolution ``size``: nucleus vs background, or with
        ``contrast_boundary`` (three-class head) background / interior / boundary as three labels."""
        logits = out.get("logits_lowres", out["logits"]).detach().float()
        classes = class_logits(logits, self.representation)
        if not (self.cfg.contrast_boundary and self.representation == "three_class"):
            classes = foreground_logits(classes)
        return F.adaptive_avg_pool2d(classes.softmax(dim=1), size)

    def _contrastive(self, unl, t_out, step):
        """Pseudo-labels at the embedding resolution (probabilities pooled alike, so patches stay aligned)."""
        cfg = self.cfg
        s_emb, t_emb = unl["embeddings"].float(), t_out["embeddings"]
        size = s_emb.shape[-2:]
        t_probs, s_probs = self._label_probs(t_out, size), self._label_probs(unl, size)
        t_conf, t_labels = t_probs.max(dim=1)
        s_labels = s_probs.argmax(dim=1)
        valid = t_conf > cfg.threshold if cfg.pseudo_label_filter else None
        return cross_patch_contrastive(
            s_emb,
            t_emb,
            s_labels,
            t_labels,
            valid,
            self.bank,
            grid=cfg.grid,
            bdp=cfg.bdp,
            fdp=cfg.fdp,
            temperature=cfg.temperature,
            num_anchors=cfg.num_anchors,
            num_bank_samples=cfg.num_bank_samples,
            anchor_source=cfg.anchor_source,
            patch_filter=cfg.patch_filter,
            generator=self._generator(s_emb.device, step),
        )

    def state_dict(self):
        return {"bank": self.bank.state_dict()} if self.bank is not None else {}

    def load_state_dict(self, state):
        if self.bank is not None and "bank" in state:
            self.bank.load_state_dict(state["bank"])
