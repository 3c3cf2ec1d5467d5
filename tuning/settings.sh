# Shared by tuning/apply and tuning/check: the recommended host settings for
# a corem-lwm2m edge gateway, each with the reason it exists.
# Environment: GW_PORTS (default "5683 5684"), GW_CPUS (shard CPUs, default
# all online CPUs; keep equal to gateway.cpus), NIC (default: interface of the
# default route).

GW_PORTS="${GW_PORTS:-5683 5684}"
GW_CPUS="${GW_CPUS:-$(seq -s, 0 $(( $(nproc) - 1 )))}"
NIC="${NIC:-$(ip route show default 2>/dev/null | awk '{for (i=1;i<NF;i++) if ($i=="dev") {print $(i+1); exit}}')}"

# name | sysctl key | recommended value | why
SYSCTLS=(
  "net.core.rmem_max|33554432|lets each shard's SO_RCVBUF (gateway.socket_recv_buffer, 8 MiB) take effect: bursts of registrations/notifications queue in the kernel instead of being dropped"
  "net.core.wmem_max|16777216|lets SO_SNDBUF (4 MiB) take effect for sendmmsg bursts of ACKs and Observe requests"
  "net.core.rmem_default|8388608|UDP sockets that do not ask (tools, load generator) still get a deep queue"
  "net.core.wmem_default|4194304|same, send side"
  "net.core.netdev_max_backlog|250000|per-CPU backlog between the NIC and UDP: at 1M pps the default 1000 overflows (drops show in /proc/net/softnet_stat column 2)"
  "net.ipv4.udp_mem|4194304 8388608 16777216|UDP memory in pages (x4 KiB = 16/32/64 GiB ceiling): with 8 MiB per socket the default pressure threshold is reached early"
  "net.ipv4.udp_rmem_min|16384|keeps a floor under per-socket receive memory under pressure"
  "net.core.busy_poll|0|busy polling off: the shards sleep in io_uring, CPU goes to packet work"
  "vm.swappiness|1|registrations and dedup state must stay in RAM; swapping them costs retransmission storms"
)

MEMLOCK_KIB=65536   # io_uring rings and registered buffers (glommio io_memory)
