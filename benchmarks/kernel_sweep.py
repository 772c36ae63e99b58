import torch, itertools, json
from memfit.kernels.decode_attention import decode_attention, decode_attention_reference
from memfit.kv.quant import quantize_keys, quantize_values
from memfit.bench import _cuda_ms
import torch.nn.functional as F
dev="cuda"
for b,n in [(1,131072),(8,32768)]:
    k=torch.randn(b,8,n,128,device=dev,dtype=torch.bfloat16); v=torch.randn_like(k); q=torch.randn(b,32,1,128,device=dev,dtype=torch.bfloat16)
    sd=_cuda_ms(lambda: F.scaled_dot_product_attention(q,k,v,enable_gqa=True))
    for bits in (4,2):
        nq=n-128; qk,qv=quantize_keys(k[:,:,:nq],bits,64),quantize_values(v[:,:,:nq],bits,64)
        args=(q[:,:,0],qk.codes,qk.scale,qk.zero,qv.codes,qv.scale,qv.zero,k[:,:,nq:].contiguous(),v[:,:,nq:].contiguous(),torch.full((b,8),nq,dtype=torch.int32,device=dev),torch.full((b,8),128,dtype=torch.int32,device=dev))
        ref=decode_attention_reference(*args,bits=bits)
        res=[]
        for pps,nw,ns in itertools.product((4,8,16),(2,4,8),(2,3)):
            try:
                out=decode_attention(*args,bits=bits,programs_per_sm=pps,num_warps=nw,num_stages=ns)
                err=(out-ref).abs().max().item()
                ms=_cuda_ms(lambda: decode_attention(*args,bits=bits,programs_per_sm=pps,num_warps=nw,num_stages=ns))
                res.append((ms,pps,nw,ns,err))
            except Exception as e: print("fail",pps,nw,ns,str(e)[:100])
        res.sort()
        print(f"b={b} n={n} bits={bits} sdpa={sd:.4f}", [f"{r[0]:.4f} pps{r[1]} w{r[2]} s{r[3]} e{r[4]:.0e}" for r in res[:5]], flush=True)
