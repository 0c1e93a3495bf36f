import os, time, tempfile
os.environ["XLA_FLAGS"]="--xla_force_host_platform_device_count=8"
import jax, numpy as np
jax.config.update("jax_disable_most_optimizations", True)
from consistency_jax.evaluation import extractors, frechet
from consistency_jax.data import digits
d=tempfile.mkdtemp()
t=time.time(); ex=extractors.digits_extractor(d); print('train', time.time()-t, ex.details)
t=time.time(); ex2=extractors.digits_extractor(d); print('load', time.time()-t, ex2.details)
tr,_=digits.load_digits_split('train'); te,_=digits.load_digits_split('test')
t=time.time(); ftr=ex(tr)['pool']; fte=ex(te)['pool']; print('feat', time.time()-t, ftr.shape)
noise=np.random.RandomState(0).randint(0,256,size=te.shape).astype(np.uint8)
fn=ex(noise)['pool']
s=frechet.feature_statistics
print('test-train', frechet.frechet_distance(*s(fte),*s(ftr)))
print('noise-train', frechet.frechet_distance(*s(fn),*s(ftr)))
blur = np.clip(te.astype(int) + np.random.RandomState(1).randint(-60,60,size=te.shape),0,255).astype(np.uint8)
print('noisy-digits-train', frechet.frechet_distance(*s(ex(blur)['pool']),*s(ftr)))
print('train half-half', frechet.frechet_distance(*s(ftr[:750]),*s(ftr[750:])))
