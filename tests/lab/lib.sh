# Shared functions for the cutover lab scripts (sourced, not run).
# A service is named by a pair: ENV (old|new|dns) and SERVICE
# (nginx|dovecot|postfix|php-fpm|radicale for old/new, nsd|unbound for dns).

LAB=${CUTOVER_LAB_DIR:-/tmp/cutover-lab}
LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PASSWORD_FILE=$LAB/secrets/probe.password
# The master user of both environments' parity Dovecot (`user*admin`, or PLAIN with authzid).
ADMIN_USER=admin
ADMIN_PASSWORD_FILE=$LAB/secrets/admin.password
USERS=(probe@example.test other@example.test)
NAMES=(webmail imap smtp mx autoconfig mail dav)
# Names that always point at the old environment, whatever the DNS state
# (`dav wellknown new old-host` redirects there).
OLD_ONLY_NAMES=(dav-old)
# parity-imap: a second Dovecot per environment for the mailbox-parity accounts
# (tests/lab/parity), on its own port so its faults touch no other test.
ENV_SERVICES=(nginx dovecot postfix php-fpm radicale parity-imap)
# Every lab server as "ENV SERVICE", in start order.
ALL_SERVICES=("dns nsd" "dns unbound"
  "old nginx" "old dovecot" "old postfix" "old php-fpm" "old radicale" "old parity-imap"
  "new nginx" "new dovecot" "new postfix" "new php-fpm" "new radicale" "new parity-imap")
# Roundcube (Debian 12: 1.6.5) is served by each environment's nginx here, by
# that environment's php-fpm pool (unix socket, no TCP port).
ROUNDCUBE_PATH=/roundcube/
RADICALE_PORT=5232

die() { echo "lab: $*" >&2; exit 1; }

env_ip() {
  case $1 in
    old) echo 127.0.0.10 ;;
    new) echo 127.0.0.20 ;;
    *) die "unknown environment '$1' (old|new)" ;;
  esac
}

svc_addr() {
  case $2 in
    nsd) echo 127.0.0.30 ;;
    unbound) echo 127.0.0.31 ;;
    *) env_ip "$1" ;;
  esac
}

svc_ports() {
  case $1 in
    nginx) echo 80 443 ;;
    dovecot) echo 143 993 ;;
    parity-imap) echo 10993 ;;
    postfix) echo 25 465 587 ;;
    nsd | unbound) echo 53 ;;
    radicale) echo "$RADICALE_PORT" ;;
    php-fpm) ;; # a unix socket: svc_socket
    *) die "unknown service '$1' (nginx|dovecot|postfix|php-fpm|radicale|parity-imap)" ;;
  esac
}

# The unix socket a service answers on, if it has one instead of ports.
svc_socket() { if [[ $2 == php-fpm ]]; then echo "$LAB/$1/php-fpm/php-fpm.sock"; fi; }

# Where a service answers, for messages and tables.
svc_endpoint() {
  local sock
  sock=$(svc_socket "$1" "$2")
  if [[ -n $sock ]]; then echo "unix:$sock"; else echo "$(svc_addr "$1" "$2"):$(svc_ports "$2" | tr ' ' ,)"; fi
}

svc_pidfile() {
  case $2 in
    nginx) echo "$LAB/$1/nginx/nginx.pid" ;;
    dovecot) echo "$LAB/$1/dovecot/run/master.pid" ;;
    parity-imap) echo "$LAB/$1/parity-imap/run/master.pid" ;;
    postfix) echo "$LAB/$1/spool/pid/master.pid" ;;
    nsd | unbound) echo "$LAB/dns/$2.pid" ;;
    php-fpm) echo "$LAB/$1/php-fpm/php-fpm.pid" ;;
    radicale) echo "$LAB/$1/radicale/radicale.pid" ;;
  esac
}

# Name of the service's main process, so a stale pid file never hits a stranger.
svc_comm() {
  case $1 in
    postfix) echo master ;;
    php-fpm) echo php-fpm8.2 ;;
    parity-imap) echo dovecot ;;
    *) echo "$1" ;;
  esac
}

svc_log() { echo "$LAB/log/$1-$2.log"; }

# Render conf/TEMPLATE to DEST, replacing @KEY@ by VALUE for each KEY=VALUE.
render() {
  local src=$1 dst=$2 kv sed_args=()
  shift 2
  for kv; do sed_args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
  sed "${sed_args[@]}" "$LAB_SRC/conf/$src" >"$dst"
}

# Move FILE.new over FILE with an mtime strictly newer than the old one:
# nsd and Dovecot's passwd-file notice changes by mtime in whole seconds.
replace_file() {
  local f=$1 old now
  old=$(stat -c %Y "$f" 2>/dev/null || echo 0)
  now=$(date +%s)
  mv -f "$f.new" "$f"
  ((now > old)) || touch -d "@$((old + 1))" "$f"
}

wait_until() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < end)) || return 1
    sleep 0.1
  done
}

tcp_open() { timeout 1 bash -c ": >/dev/tcp/$1/$2" 2>/dev/null; }

# True when something accepts connections on the unix socket PATH.
unix_open() {
  [[ -S $1 ]] && timeout 2 /usr/bin/python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])' "$1" 2>/dev/null
}

# Close every file descriptor above 2 (run in the subshell that execs a
# daemon): `flock LOCK tests/lab/up` hands its lock to the command as fd 3, and
# a daemon that kept it would hold the shared lab lock for ever.
close_fds() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    ((fd > 2)) || continue
    { eval "exec $fd>&-"; } 2>/dev/null || true
  done
}

# Become COMMAND with no inherited descriptors but 0-2 (see close_fds). Call it
# in a subshell, `(daemon CMD...)`, or in the background, `daemon CMD... &`
# (then $! is the daemon's own pid).
daemon() {
  close_fds
  exec "$@"
}

# A zombie counts as gone (pid 1 here reaps slowly).
alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $stat != Z* ]]
}

descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1"); do
    echo "$child"
    descendants "$child"
  done
}

# Print the pid of a running service, or fail.
svc_pid() {
  local pidfile pid
  pidfile=$(svc_pidfile "$1" "$2")
  # (php-fpm's pid file has no final newline)
  [[ -s $pidfile ]] && { read -r pid <"$pidfile" || [[ -n ${pid:-} ]]; } && alive "$pid" &&
    [[ $(ps -o comm= -p "$pid") == "$(svc_comm "$2")"* ]] && echo "$pid"
}

svc_healthy() {
  local addr port
  svc_pid "$1" "$2" >/dev/null || return 1
  addr=$(svc_addr "$1" "$2")
  case $2 in
    nsd | unbound) "$LAB_SRC/dnsq" "$addr" ns.example.test >/dev/null 2>&1 ;;
    php-fpm) unix_open "$(svc_socket "$1" "$2")" ;;
    *) for port in $(svc_ports "$2"); do tcp_open "$addr" "$port" || return 1; done ;;
  esac
}

# True when nothing listens on the service's address and ports (TCP or UDP).
ports_closed() {
  local addr port sock
  sock=$(svc_socket "$1" "$2")
  if [[ -n $sock ]]; then ! unix_open "$sock"; return; fi
  addr=$(svc_addr "$1" "$2")
  for port in $(svc_ports "$2"); do [[ -z $(ss -Hltun src "$addr:$port") ]] || return 1; done
}

none_alive() {
  local pid
  for pid; do ! alive "$pid" || return 1; done
}

# Stop a service's whole process tree (SIGTERM, then SIGKILL after 10 s).
svc_stop() {
  local pid pids
  if pid=$(svc_pid "$1" "$2"); then
    mapfile -t pids < <(echo "$pid"; descendants "$pid")
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait_until 10 none_alive "${pids[@]}" || kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_until 5 none_alive "${pids[@]}" || die "$1 $2 (pid $pid) does not stop"
  fi
  rm -f "$(svc_pidfile "$1" "$2")"
  wait_until 10 ports_closed "$1" "$2" ||
    die "$1 $2: $(svc_endpoint "$1" "$2") still answers after stop"
}

# Start a service from its rendered config unless it is already healthy;
# wait until it answers.
svc_start() {
  local env=$1 svc=$2 log dir
  svc_healthy "$env" "$svc" && return 0
  svc_stop "$env" "$svc"
  log=$(svc_log "$env" "$svc")
  dir=$LAB/$env/$svc
  case $svc in
    nginx) (daemon nginx -e "$log" -c "$dir/nginx.conf") >>"$log" 2>&1 </dev/null ;;
    dovecot | parity-imap) (daemon dovecot -c "$dir/dovecot.conf") >>"$log" 2>&1 </dev/null ;;
    postfix)
      postfix -c "$dir" check || die "postfix -c $dir check failed; see $log"
      (daemon postfix -c "$dir" start) >>"$log" 2>&1 </dev/null ;;
    nsd) (daemon nsd -c "$LAB/dns/nsd.conf") >>"$log" 2>&1 </dev/null ;;
    unbound) (daemon unbound -c "$LAB/dns/unbound.conf") >>"$log" 2>&1 </dev/null ;;
    # Both stay in the foreground (php-fpm writes its own pid file).
    php-fpm) daemon php-fpm8.2 -F -y "$dir/php-fpm.conf" >>"$log" 2>&1 </dev/null & ;;
    radicale)
      daemon radicale -C "$dir/config" >>"$log" 2>&1 </dev/null &
      echo $! >"$(svc_pidfile "$env" "$svc")" ;;
  esac || die "$env $svc failed to start; see $log"
  wait_until 15 svc_healthy "$env" "$svc" || die "$env $svc did not come up; see $log"
}

# The addresses (sorted, space-separated) that every name has in zone STATE.
state_ips() {
  case $1 in
    old) echo 127.0.0.10 ;;
    new) echo 127.0.0.20 ;;
    mixed) echo 127.0.0.10 127.0.0.20 ;;
    *) die "unknown DNS state '$1' (old|new|mixed)" ;;
  esac
}

# A setting of the zone besides its A state, kept in $LAB/dns/NAME: `spf`
# (old|both: the outbound addresses SPF lists), `dkim` and `dmarc` (on|off).
zone_setting() { cat "$LAB/dns/$1" 2>/dev/null || echo "$2"; }

# The SPF policy of example.test. `both` adds the new address through an
# include, as a new provider's policy would, so an SPF evaluator's own lookups
# (the include's TXT, its host's A) are exercised too.
spf_record() {
  case $1 in
    old) echo 'v=spf1 ip4:127.0.0.10 -all' ;;
    both) echo 'v=spf1 ip4:127.0.0.10 include:_spf-new.example.test -all' ;;
    *) die "unknown SPF setting '$1' (old|both)" ;;
  esac
}

# The DKIM key of selector `lab`, made once (nothing signs with it yet).
ensure_dkim_key() {
  local dir=$LAB/dkim log=$LAB/log/openssl.log
  [[ -s $dir/lab.pub ]] && return 0
  mkdir -p "$dir"
  { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/lab.key" &&
    openssl pkey -in "$dir/lab.key" -pubout -outform DER | base64 -w0 >"$dir/lab.pub"; } 2>>"$log" ||
    die "making the DKIM key failed; see $log"
  chmod 0600 "$dir/lab.key"
}

# Its key record as TXT strings: they are joined, each holds at most 255 characters.
dkim_txt() {
  printf '"v=DKIM1; k=rsa; p="'
  fold -w 200 "$LAB/dkim/lab.pub" | sed 's/.*/ "&"/' | tr -d '\n'
}

# Write the example.test zone for STATE (old|new|mixed) with the next serial.
write_zone() {
  local state=$1 zone=$LAB/dns/example.test.zone ips serial name ip
  ips=$(state_ips "$state")
  ensure_dkim_key
  serial=$(($(cat "$LAB/dns/serial" 2>/dev/null || echo 0) + 1))
  {
    printf '$ORIGIN example.test.\n$TTL 300\n'
    printf '@ SOA ns.example.test. hostmaster.example.test. %s 3600 600 86400 300\n' "$serial"
    printf '@ NS ns.example.test.\nns A 127.0.0.30\n@ MX 10 mx.example.test.\n'
    printf '@ TXT "%s"\n_spf-new TXT "v=spf1 a:mx-new.example.test -all"\n' "$(spf_record "$(zone_setting spf old)")"
    [[ $(zone_setting dkim on) == off ]] || printf 'lab._domainkey TXT %s\n' "$(dkim_txt)"
    [[ $(zone_setting dmarc on) == off ]] || printf '_dmarc TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"\n'
    # The outbound servers' names, which the reverse zone's PTRs point to.
    printf 'mx-old A 127.0.0.10\nmx-new A 127.0.0.20\n'
    # Too large for a 512-byte UDP answer: tests of the DNS probe's TCP retry.
    printf 'big TXT "chunk-%02d-abcdefghijklmnopqrstuvwxyz-0123456789-abcdefghijklmnopqrstuvwxyz"\n' {1..12}
    for name in "${NAMES[@]}"; do
      for ip in $ips; do printf '%s A %s\n' "$name" "$ip"; done
    done
    for name in "${OLD_ONLY_NAMES[@]}"; do printf '%s A %s\n' "$name" "$(env_ip old)"; done
    # RFC 6764 discovery of CalDAV/CardDAV over TLS: host, port and context path.
    printf '_caldavs._tcp SRV 0 1 443 dav.example.test.\n_caldavs._tcp TXT "path=/"\n'
    printf '_carddavs._tcp SRV 0 1 443 dav.example.test.\n_carddavs._tcp TXT "path=/"\n'
    # The provider's SPF policy that hosted customer domains include
    # (tests/lab/customers), and the autoconfig host their CNAMEs point to.
    printf 'spf TXT "v=spf1 ip4:127.0.0.10 ip4:127.0.0.20 -all"\n'
    if [[ " ${NAMES[*]} " != *" autoconfig "* ]]; then
      for ip in $ips; do printf 'autoconfig A %s\n' "$ip"; done
    fi
  } >"$zone.new"
  replace_file "$zone"
  echo "$serial" >"$LAB/dns/serial"
  echo "$state" >"$LAB/dns/state"
}

dns_answer() { "$LAB_SRC/dnsq" "$1" "$2" A 2>/dev/null | xargs; }

ensure_password() {
  [[ -s $PASSWORD_FILE ]] && return 0
  mkdir -p "$(dirname "$PASSWORD_FILE")"
  chmod 0700 "$(dirname "$PASSWORD_FILE")"
  (umask 077 && openssl rand -hex 16 >"$PASSWORD_FILE")
}

ensure_admin_password() {
  [[ -s $ADMIN_PASSWORD_FILE ]] && return 0
  mkdir -p "$(dirname "$ADMIN_PASSWORD_FILE")"
  (umask 077 && openssl rand -hex 16 >"$ADMIN_PASSWORD_FILE")
}

# ENV's master passdb: the admin with the admin password.
write_masters() {
  local f=$LAB/$1/parity-imap/masters
  printf '%s:{PLAIN}%s\n' "$ADMIN_USER" "$(<"$ADMIN_PASSWORD_FILE")" >"$f.new"
  chgrp dovecot "$f.new"
  chmod 0640 "$f.new"
  replace_file "$f"
}

# Replace ENV's Dovecot users file with stdin, and Radicale's htpasswd with
# the same users and passwords.
install_users() {
  local f=$LAB/$1/dovecot/users
  cat >"$f.new"
  chgrp dovecot "$f.new"
  chmod 0640 "$f.new"
  replace_file "$f"
  write_dav_users "$1"
}

# Radicale's htpasswd for ENV, from ENV's Dovecot users file (`user:{PLAIN}pw`
# -> `user:pw`, htpasswd_encryption = plain). Radicale 3.1 reads the file at
# every login, so a change counts from the next request on.
write_dav_users() {
  local f=$LAB/$1/radicale/users
  mkdir -p "$LAB/$1/radicale"
  (umask 077 && sed 's/^\([^:]*\):{PLAIN}/\1:/' "$LAB/$1/dovecot/users" >"$f.new")
  mv -f "$f.new" "$f"
}

# If ENV's Dovecot runs, wait until it accepts USER with PASSWORD (passwd-file
# is re-read when it changes, at most once a second).
wait_auth() {
  svc_pid "$1" dovecot >/dev/null || return 0
  wait_until 5 doveadm -c "$LAB/$1/dovecot/dovecot.conf" auth test "$2" "$3" >/dev/null 2>&1 ||
    die "$1 dovecot does not accept the new password of $2; see $(svc_log "$1" dovecot)"
}

# Give every lab user the lab password in ENV.
reset_users() {
  local env=$1 pw user
  pw=$(<"$PASSWORD_FILE")
  for user in "${USERS[@]}"; do printf '%s:{PLAIN}%s\n' "$user" "$pw"; done | install_users "$env"
  for user in "${USERS[@]}"; do wait_auth "$env" "$user" "$pw"; done
}

set_password() {
  local env=$1 user=$2 pw=$3 f=$LAB/$1/dovecot/users
  [[ $pw != *[:$'\n']* ]] || die "a password must not contain ':' or a newline"
  grep -q "^$user:" "$f" || die "no user $user in $f"
  P="{PLAIN}$pw" U=$user awk -F: -v OFS=: '$1 == ENVIRON["U"] { $2 = ENVIRON["P"] } 1' "$f" | install_users "$env"
  wait_auth "$env" "$user" "$pw"
}

# ---- Roundcube (tests/lab/webmail) -------------------------------------------

WEBMAIL_PLUGINS_DEFAULT="archive zipdownload"
WEBMAIL_SKIN_DEFAULT=elastic

# A Roundcube setting of ENV (plugins|skin) kept in $LAB/ENV/roundcube/NAME.
webmail_setting() {
  local default
  if [[ $2 == plugins ]]; then default=$WEBMAIL_PLUGINS_DEFAULT; else default=$WEBMAIL_SKIN_DEFAULT; fi
  cat "$LAB/$1/roundcube/$2" 2>/dev/null || echo "$default"
}

# Write ENV's settings.inc.php (included by its config.inc.php) from the kept
# settings. Roundcube reads it at every request; its mtime only ever grows, so
# opcache (revalidate_freq = 0) never serves the old one.
write_webmail_settings() {
  local env=$1 f=$LAB/$1/roundcube/config/settings.inc.php plugins skin p list=()
  plugins=$(webmail_setting "$env" plugins)
  skin=$(webmail_setting "$env" skin)
  for p in $plugins; do list+=("'$p'"); done
  {
    printf '<?php\n// Written by tests/lab (webmail plugins|skin|reset).\n'
    printf "\$config['plugins'] = [%s];\n" "$(IFS=,; echo "${list[*]}")"
    printf "\$config['skin'] = '%s';\n" "$skin"
  } >"$f.new"
  chmod 0644 "$f.new"
  replace_file "$f"
}

WEBMAIL_DB() { echo "$LAB/$1/roundcube/db/roundcube.sqlite"; }

# Set the mode of ENV's Roundcube DB and its WAL companions (Roundcube turns
# WAL on; sqlite makes -shm with the DB's mode of the moment, so a -shm left
# read-only would keep the DB read-only after a fix). 0440: www-data, the
# owner that php-fpm runs Roundcube as, can only read it.
webmail_db_mode() {
  local f
  for f in "$(WEBMAIL_DB "$1")"{,-wal,-shm}; do
    [[ -e $f ]] || continue
    chown www-data:www-data "$f"
    chmod "$2" "$f"
  done
}

# ---- Radicale (tests/lab/dav) ------------------------------------------------

DAV_LEGACY_PATH=/SOGo/dav

# What ENV's nginx does with /.well-known/caldav|carddav: ok (301 to /),
# missing (404 from nginx; Radicale 3.1.8 would itself 301 them to /, so nginx
# must answer them), old-host (301 to https://dav-old.example.test/).
dav_wellknown() { cat "$LAB/$1/radicale/wellknown" 2>/dev/null || echo ok; }

# The nginx include of ENV's dav server: well-known redirects, and the legacy
# path (old serves Radicale there too, new redirects it to the current path).
write_dav_routes() {
  local env=$1 f=$LAB/$1/nginx/dav-routes.conf ip target mode
  ip=$(env_ip "$env")
  mode=$(dav_wellknown "$env")
  case $mode in
    ok) target=/ ;;
    old-host) target=https://dav-old.example.test/ ;;
    missing) target= ;;
    *) die "unknown well-known setting '$mode' (ok|missing|old-host)" ;;
  esac
  {
    echo "# Written by tests/lab (well-known: $mode)."
    if [[ -n $target ]]; then
      printf 'location = /.well-known/caldav { return 301 %s; }\n' "$target"
      printf 'location = /.well-known/carddav { return 301 %s; }\n' "$target"
    else
      printf 'location ^~ /.well-known/ { return 404; }\n'
    fi
    if [[ $env == old ]]; then
      cat <<END
location $DAV_LEGACY_PATH/ {
    proxy_pass http://$ip:$RADICALE_PORT/;
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-Proto https;
    proxy_set_header X-Script-Name $DAV_LEGACY_PATH;
}
END
    else
      printf 'location = %s { return 301 /; }\n' "$DAV_LEGACY_PATH"
      printf 'location ~ ^%s/(.*)$ { return 301 /$1$is_args$args; }\n' "$DAV_LEGACY_PATH"
    fi
  } >"$f.new"
  mv -f "$f.new" "$f"
}

# Seeded DAV data, per user: "COLLECTION KIND COUNT" (KIND: events|contacts|
# empty-calendar). The same bytes in both environments (same ETags).
dav_seed_plan() {
  case $1 in
    probe@example.test) printf '%s\n' "calendar events 5" "probe-writes empty-calendar 0" "contacts contacts 7" ;;
    other@example.test) printf '%s\n' "calendar events 3" "contacts contacts 2" ;;
  esac
}

DAV_USERS=(probe@example.test other@example.test)

# Event I of USER: events 1-4 on 2030-01-07..10 09:00-10:00 UTC, 5 and later
# on 2030-03-1x (outside a January time range).
dav_event() {
  local user=$1 i=$2 day
  if ((i <= 4)); then day=$(printf '203001%02d' $((6 + i))); else day=$(printf '203003%02d' $((10 + i))); fi
  printf 'BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//cutover-lab//seed//EN\r\nBEGIN:VEVENT\r\n'
  printf 'UID:lab-event-%s-%s@example.test\r\nDTSTAMP:20250101T000000Z\r\n' "${user%@*}" "$i"
  printf 'DTSTART:%sT090000Z\r\nDTEND:%sT100000Z\r\nSUMMARY:Lab event %s\r\n' "$day" "$day" "$i"
  printf 'END:VEVENT\r\nEND:VCALENDAR\r\n'
}

dav_contact() {
  local user=$1 i=$2
  printf 'BEGIN:VCARD\r\nVERSION:3.0\r\nUID:lab-contact-%s-%s@example.test\r\n' "${user%@*}" "$i"
  printf 'FN:Lab Contact %s\r\nN:Contact %s;Lab;;;\r\n' "$i" "$i"
  printf 'EMAIL;TYPE=INTERNET:contact%s@example.test\r\nEND:VCARD\r\n' "$i"
}

# Write the seeded collections of every DAV user under DIR (collection-root).
dav_write_seed() {
  local root=$1 user coll kind n i d
  for user in "${DAV_USERS[@]}"; do
    mkdir -p "$root/$user"
    while read -r coll kind n; do
      d=$root/$user/$coll
      mkdir -p "$d"
      case $kind in
        events)
          printf '{"C:supported-calendar-component-set": "VEVENT", "D:displayname": "Calendar", "ICAL:calendar-color": "#3465a4", "tag": "VCALENDAR"}' >"$d/.Radicale.props"
          for ((i = 1; i <= n; i++)); do dav_event "$user" "$i" >"$d/event-$i.ics"; done ;;
        empty-calendar)
          printf '{"C:supported-calendar-component-set": "VEVENT,VTODO", "D:displayname": "Probe writes", "tag": "VCALENDAR"}' >"$d/.Radicale.props" ;;
        contacts)
          printf '{"D:displayname": "Contacts", "tag": "VADDRESSBOOK"}' >"$d/.Radicale.props"
          for ((i = 1; i <= n; i++)); do dav_contact "$user" "$i" >"$d/contact-$i.vcf"; done ;;
      esac
    done < <(dav_seed_plan "$user")
  done
}

# Replace ENV's Radicale storage with the seed (swapped in by rename; Radicale
# lists the directories at every request, nothing to restart).
dav_seed() {
  local dir=$LAB/$1/radicale
  rm -rf "$dir/collections.new" "$dir/collections.old"
  dav_write_seed "$dir/collections.new/collection-root"
  [[ ! -e $dir/collections ]] || mv "$dir/collections" "$dir/collections.old"
  mv "$dir/collections.new" "$dir/collections"
  rm -rf "$dir/collections.old"
}
