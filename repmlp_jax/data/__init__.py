"""The input pipeline (tf.data, tensorflow-datasets): data sets, preprocessing, RandAugment,
mixup/CutMix and the ImageNet metadata.
"""
