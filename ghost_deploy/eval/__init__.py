"""Evaluation stage: boxes, head decoding, NMS (torch and numpy twins), mAP, the one validation path."""
