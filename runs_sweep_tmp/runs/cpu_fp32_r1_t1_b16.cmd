/work/main/build/bin/lancet bench train --json --steps 8 --warmup 3 --device cpu --precision fp32 --threads 1 --batch-size 16 --image-size 64 
