"""Data: the tf.data input pipeline and everything images go through before a model sees them.

Belongs here: data sets and batching (`input_pipeline`: tfds, image folders, the built-in
digits), per-image transforms (`preprocess`: training in TensorFlow ops), the official
evaluation preprocessing (`eval_transform`: PIL and numpy, shared with inference on files),
RandAugment (`randaugment`), mixup / CutMix targets (`mixup`, jax, run inside the train step)
and the ImageNet metadata (`imagenet`). `eval_transform` and `imagenet` import no TensorFlow.
"""
