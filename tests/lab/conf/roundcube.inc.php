<?php
// Roundcube for the cutover lab, environment @ENV@ (rendered by tests/lab/up;
// php-fpm's pool sets ROUNDCUBE_CONFIG_DIR to this file's directory).
$config = [];
$config['db_dsnw'] = 'sqlite:///@LAB@/@ENV@/roundcube/db/roundcube.sqlite?mode=0640';
$config['log_driver'] = 'file';
$config['log_dir'] = '@LAB@/@ENV@/roundcube/logs/';
$config['temp_dir'] = '@LAB@/@ENV@/roundcube/temp/';

// This environment's Dovecot and Postfix, by address (no resolver lookups),
// verified against the lab CA under the service names.
$config['imap_host'] = 'ssl://@IP@:993';
$config['imap_conn_options'] = ['ssl' => ['verify_peer' => true, 'verify_peer_name' => true,
    'peer_name' => 'imap.example.test', 'cafile' => '@LAB@/ca/ca.crt']];
$config['smtp_host'] = 'tls://@IP@:587';
$config['smtp_user'] = '%u';
$config['smtp_pass'] = '%p';
$config['smtp_conn_options'] = ['ssl' => ['verify_peer' => true, 'verify_peer_name' => true,
    'peer_name' => 'smtp.example.test', 'cafile' => '@LAB@/ca/ca.crt']];

$config['product_name'] = 'Roundcube Webmail';
$config['support_url'] = '';
$config['enable_spellcheck'] = false;
// Per environment, made once by tests/lab/up ($LAB/@ENV@/roundcube/des_key).
$config['des_key'] = '@DES_KEY@';
// 0 turns the failed-login limiter off (1.6 default: 3 a minute per user),
// so wrong-password tests never lock an account.
$config['login_rate_limit'] = 0;

// The archive plugin shows its button (and loads its script) only with a folder.
$config['archive_mbox'] = 'Archive';

// Plugins and skin: written by `tests/lab/webmail` (default by tests/lab/up).
require __DIR__ . '/settings.inc.php';
